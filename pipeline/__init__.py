"""The patch-wise algorithm and its bookkeeping, in numpy only: tiling and blending, the reference
assignment, the streaming order of references and queries, BitOPs accounting and the description
of a model that a runtime needs. Both the compiled engine and the PyTorch reference run through
it; it imports neither."""
