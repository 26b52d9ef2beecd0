"""What extractors call at run time: the layers and functions the rewrite passes put in their graphs. Imports
nothing from the pipeline's stages, so every stage may use it."""
