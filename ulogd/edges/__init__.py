"""I/O: the event loop, sockets, devices, corosync, threads and clocks."""
