"""Speed paths that keep the maths: BN folding for teachers, the exact teacher-output cache, a sync-free
(CUDA-graph-capturable) training step, and the glue that applies a run's ``train.fast`` options.

    fold.py            conv -> BN folding of an inference-only model, module names kept
    teacher_cache.py   the teachers' logits for every crop/flip view, computed once and looked up
    graph_step.py      forward + backward + foreach SGD in one device-side call, captured on CUDA
    teachers.py        a run's teachers prepared for its options (cache or fold)
"""
