"""Training: rollouts, teacher scoring and the SGSD loop.

Kept free of imports so `import sgsd_fast.train.<module>` loads only what that module needs.
"""
