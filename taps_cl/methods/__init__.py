"""Task-learning methods: how a task's own tensors are trained on the frozen base and stored.

`base` states the `Method` interface (and the hooks generic code calls instead of naming a
method), `catalog` finds a method by name, `options` validates option values, `layers`, `blocks`
and `merging` are what methods share, and each other module (or package) is one method:
`taps`, `finetune`, `linear`, `adapter`, `fusion`, `progressive`. Methods never see the registry.
"""
