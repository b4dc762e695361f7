"""The sans-IO request engine: the table of logs, dispatch, actions out."""
