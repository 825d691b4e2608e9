"""The Gradio preview: original vs erased images side by side, an attack on demand, a report's grids.

Needs the ``ui`` extra (``pip install 'erasekit[ui]'``); start it with ``erasekit preview``.
"""
