"""Training: the loop, the update step, the per-method objectives (`objectives/`) and the teachers.

Kept free of imports so `import sgsd_fast.train.<module>` loads only what that module needs.
"""
