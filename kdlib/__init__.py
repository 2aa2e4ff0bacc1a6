"""kdlib: the distillation losses, alignment, caches and trainers behind the book.

Modules are one concept each: `losses` (pure tensor functions), `qa` (SQuAD windows,
answers and scores), `data` (loaders over a local mirror or the hub), `registry` (offline
model names), `cache` (teacher outputs computed once), `trainer` (the Trainer subclass),
`report` (metrics.json), and `recipes` (the experiments the chapters run).
"""

__version__ = "0.1.0"
