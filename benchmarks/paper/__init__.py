"""Reproductions of the measurements of Jain et al., "Dynamic Space-Time Scheduling for GPU
Inference" (UC Berkeley, 2018) with jaxmt against the baselines the paper compares.

One module per figure or table, each measuring in its own process (JAX and PyTorch never
share a process, so neither starves the other of GPU memory):

  table1   R same-size GEMMs, one per tenant: jaxmt's space-time step, the bare batched
           dot_general, time-only (one program per tenant), space-only (one CUDA stream per
           tenant, PyTorch, with and without CUDA graphs) and torch.bmm.
  figure3  ResNet-50 and MobileNetV2 latency and throughput per tenant count: exclusive,
           time-only, space-only, jaxmt; per-tenant latency spread (the paper's Figure 4).
  figure5  how many ResNet-50 tenants one GPU holds and serves (float32 and bfloat16).

``driver`` runs them in subprocesses and writes JSON, PNGs and README tables
(``PYTHONPATH=. python benchmarks/paper.py``).
"""
