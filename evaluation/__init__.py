"""`ddpm-eval`: the paper's measures through any backend. It consumes both sides of the flow (the runtime's
backends and math; train's digit classifier, Inception network and dataset readers, imported lazily only where a
command needs them), so it sits beside them rather than inside the torch-free runtime."""
