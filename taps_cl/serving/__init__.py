"""Using many tasks at once: the multi-task model and its segment plan, and the web app.

`multitask` holds the base once and every served task's own tensors once, and runs a batch in
which each image names its task(s), computing a layer once for all tasks that share it. `app`
is the FastAPI application behind `taps-cl serve` (the inference endpoints, `http`) and
`taps-cl ui` (the read-only pages, `ui/`); FastAPI is the optional extra `[serve]`.
"""
