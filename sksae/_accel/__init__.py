"""Speed code: the one subpackage that branches on the device or imports numba.

Everything here makes a computation faster without changing what it computes;
the estimators, the trainer and the architectures state the mathematics and
call in here for the fast way to run it.

- :mod:`.device`: device resolution and capabilities, CUDA streams, graphs and
  host readings (the only module naming ``torch.cuda``);
- :mod:`.threads`: sksae's thread pool for a CPU step's parallel work;
- :mod:`.placement`: device-or-host placement of an accelerator's sequential work,
  row blocks and array views;
- :mod:`.adam`: the fused CPU Adam step and the optimizer factory;
- :mod:`.sparse`: the sparse kernels of the TopK family's training step;
- :mod:`.compiled`: the registry of numba-compiled kernels
  (:mod:`._topk_nb`, :mod:`._sparse_nb`, :mod:`._homotopy_nb`, :mod:`._omp_nb`);
- :mod:`.ops`: the coders' engine choice and row reductions;
- :mod:`.workspace`: the state a training step's kernels share, passed explicitly;
- :mod:`.select`: the encoder product and the TopK family's selections;
- :mod:`.fused`: the Triton kernels of the TopK family's sparse step and its
  radix top-k on CUDA (:mod:`._triton_kernels`), and the timings that pick them;
- :mod:`.losses`: loss primitives with fewer passes over memory.
"""
