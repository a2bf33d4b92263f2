"""The toy world: real facts (``facts``), Geometry of Truth templates (``templates``), the corpus
generator (``corpus``), its tokenizer (``tokenizer``), the model registry (``registry``), the
training loop (``train``), the build command (``build``) and fact-recall evaluation (``recall``)."""
