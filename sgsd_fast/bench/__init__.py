"""Benchmarks: the fused kernels and the SGSD step against the naive way and peer libraries.

`presets` (what to run), `kernels` and `e2e` (the cases), `naive` (the baseline), `measure`
(time and memory), `runner` (a preset end to end), `report` (tables, JSON, plot). The command
line is `sgsd-fast bench` (`sgsd_fast.commands.bench`).
"""
