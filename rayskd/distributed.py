"""Process groups of rayskd's own: the learner ranks (DeepSpeed data parallelism) and a
teacher worker's tensor-parallel ranks each form one over torch.distributed."""
from __future__ import annotations


def init_process_group(backend: str, addr: str, port: int, rank: int, world_size: int,
                       timeout_s: float = 1800.0) -> None:
    """torch.distributed over a rendezvous store that listens on `addr` only (the node's
    address the learners reach each other on). torch's env:// store binds every interface,
    with no credentials, so rank 0 binds the socket itself and hands it to the store."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    listen_fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(128, world_size))
        listen_fd = sock.detach()
    store = dist.TCPStore(addr, port, world_size, rank == 0, timeout, master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
