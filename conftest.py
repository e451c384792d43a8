"""pytest setup shared by every test file: run Triton kernels in Triton's CPU interpreter.

triton decides between interpreter and compiler when a kernel is defined (router_triton's import), so
TRITON_INTERPRET=1 is set here, before any test file is collected. `TRITON_INTERPRET=0 python -m pytest`
on a CUDA machine runs test_router_triton.py against the compiled kernels instead.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: one thread per process is as fast, and torchrun tests start several processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
