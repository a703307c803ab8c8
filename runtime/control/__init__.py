"""The job control plane: the coordinator, its clients and the commands plait status / stop / snapshot."""
