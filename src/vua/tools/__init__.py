"""Tools around VUA, not part of the engine or its faces: the demo (``python -m vua.tools.demo``),
the end-to-end benchmark (``vua bench``), the vLLM engine runner both use, and the built-in
random-weight model they run on. They need vLLM and its dependencies; the engine does not.
"""
