"""A request translated once into the units the filters compare against."""

from __future__ import annotations

from dataclasses import dataclass

from placement.model import Device, NumaPolicy, Request, ThreadPolicy
from placement.units import format_mib, format_page


def _norm(pci_id: str | None) -> str | None:
    return pci_id.lower().removeprefix("0x") if pci_id else None


@dataclass(frozen=True)
class Need:
    request: Request
    slots: int  # host cpus needed: one per vCPU (idle siblings are counted separately)
    isolate: bool
    units: int  # memory in MiB, or in hugepages of `page_kib`
    page_kib: int | None
    nics: int
    vendor: str | None  # normalized: lower case, no 0x
    product: str | None
    problem: str | None  # why no cluster could ever satisfy the request as written

    @property
    def strict(self) -> bool:
        return self.request.numa == NumaPolicy.STRICT

    def wants(self, device: Device) -> bool:
        if self.vendor is not None and _norm(device.vendor) != self.vendor:
            return False
        return self.product is None or _norm(device.product) == self.product

    def memory_text(self) -> str:
        return format_mib(self.request.memory_mib)

    def nic_filter_text(self) -> str:
        """' from vendor 0x8086' / ' matching 8086:1572' / ''."""
        if self.vendor and self.product:
            return f" matching {self.vendor}:{self.product}"
        if self.vendor:
            return f" from vendor 0x{self.vendor}"
        if self.product:
            return f" with product 0x{self.product}"
        return ""


def need_of(request: Request) -> Need:
    problem = None
    page = request.hugepage_kib
    units = request.memory_mib
    if request.cpus < 1:
        problem = f"a job needs at least 1 vCPU; asked for {request.cpus}"
    elif request.memory_mib < 1:
        problem = f"a job needs some memory; asked for {request.memory_mib} MiB"
    elif request.nics < 0:
        problem = f"asked for {request.nics} NICs"
    elif request.mem_nodes and request.numa == NumaPolicy.STRICT:
        problem = ("memory-only nodes (--mem-nodes) need --numa prefer or any: "
                   "strict keeps memory on the node of the job's cpus")
    elif page is not None:
        if page <= 0:
            problem = f"hugepage size must be positive; asked for {page} KiB"
        elif (request.memory_mib * 1024) % page:
            problem = (f"{format_mib(request.memory_mib)} is not a whole number of "
                       f"{format_page(page)} hugepages")
        else:
            units = request.memory_mib * 1024 // page
    return Need(
        request=request,
        slots=request.cpus,
        isolate=request.threads == ThreadPolicy.ISOLATE,
        units=units,
        page_kib=page,
        nics=request.nics,
        vendor=_norm(request.nic_vendor),
        product=_norm(request.nic_product),
        problem=problem,
    )
