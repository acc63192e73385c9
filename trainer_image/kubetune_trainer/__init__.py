"""kubetune's trainer: the program every worker pod runs under torchrun."""
