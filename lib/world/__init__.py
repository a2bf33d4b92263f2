"""The toy world: real facts (``facts``), Geometry of Truth templates (``templates``), the corpus
generator (``corpus``), its tokenizer (``tokenizer``), the model registry (``registry``), the
training loop (``train``), the build command (``build``), fact-recall evaluation (``recall``) and
conditional training with metatokens (``metatokens``: a truth classifier, tagging, notebook 15's
two models)."""
