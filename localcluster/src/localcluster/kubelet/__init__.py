"""The local kubelet: runs pods bound to the emulated nodes as local process groups."""
