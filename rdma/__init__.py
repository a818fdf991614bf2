"""rdax.rdma: the verbs wrapper, the only code in rdax that imports pyverbs.

It knows nothing of gRPC or files: devices, protection domains, memory
regions (pinned with an ODP fallback) and RC connections with the data verbs.
"""
from .connection import REM_ACCESS_ERR, Chunk, Connection, EndpointInfo
from .device import Device, find_device, list_devices, local_device, open_device
from .errors import Abandoned, ConnectError, DeviceNotFound, RegistrationError, VerbsError, WorkCompletionError
from .mr import Access, LocalBuffer, MemoryRegion, register
from .mw import MemoryWindow

__all__ = [
    "Abandoned", "Access", "Chunk", "ConnectError", "Connection", "Device", "DeviceNotFound", "EndpointInfo",
    "LocalBuffer", "MemoryRegion", "MemoryWindow", "REM_ACCESS_ERR", "RegistrationError", "VerbsError",
    "WorkCompletionError", "find_device", "list_devices", "local_device", "open_device", "register",
]
