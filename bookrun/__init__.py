"""The book's orchestration: validate a chapter's parameters, execute it, build the HTML.

Kept apart from `kdlib`, which is the modelling library: nothing here trains anything.
"""
