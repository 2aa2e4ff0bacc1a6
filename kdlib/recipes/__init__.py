"""The experiments the chapters run, one module per chapter, built from kdlib's parts."""
