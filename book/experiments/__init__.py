"""Each chapter's experiment, one module per chapter, named after it and built from kdlib's parts.

What is particular to one chapter lives here, beside the chapter: its parameters and their
checks, the stages its notebook calls, the papers' figures, and the wording and rules of its
verdicts. What more than one chapter, the benchmark or a reader's own code can use belongs in
`kdlib`, with its unit tests.
"""
