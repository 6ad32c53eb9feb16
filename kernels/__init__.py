"""Triton kernels and their launchers (installed as fastcore5.kernels).

Launchers take tensors, check nothing the op layer already checked, allocate outputs and pick
the grid. They know nothing of autograd. Importing a module here imports triton.
"""
