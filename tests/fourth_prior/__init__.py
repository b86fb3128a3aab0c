"""A prior from outside unclip, as a user would add one: a net file, a module file and a model config
(``conf/model/linear_prior.yaml``, reached with ``hydra.searchpath``). Nothing in unclip names it."""
