"""Bridges that run headrace operators, with their declared state, inside other frameworks.

Each bridge lives in its own module and imports its framework only when that module is imported
(``headrace.runtime.integrations.faust`` needs ``pip install 'headrace[faust]'``).
"""
