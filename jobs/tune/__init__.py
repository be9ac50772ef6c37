"""`minit2i tune sampling|schedule`: search (objective, search space, the Tuner run), sampling
(trials that sample a fixed checkpoint), schedule (trials that are `minit2i train` runs), reports
(table, plot, best config and grids)."""
