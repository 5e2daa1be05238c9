"""Tools beside the strategies: the `distmnist` command, bench, compare, predict, evaluate."""
