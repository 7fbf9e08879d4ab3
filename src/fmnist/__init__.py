"""Fashion-MNIST CNN pipeline: the library behind the DVC stages in dvc.yaml."""
