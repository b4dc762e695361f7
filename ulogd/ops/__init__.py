"""What an operator runs or reads: the command line, control socket, metrics, tools."""
