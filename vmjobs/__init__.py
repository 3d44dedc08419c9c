"""vmjobs: lab and HPC jobs in minimal, pinned KVM guests managed through libvirt."""

__version__ = "0.1.0"
