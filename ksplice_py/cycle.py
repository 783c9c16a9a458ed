"""The patch cycle: prepare -> apply -> finalize -> cutover -> cleanup, or abort.

Named after EBS online patching (docs/design.md); in code: ``prepare``,
``link`` (the design's *apply* phase: "apply" alone names the whole cycle,
``Process.apply``), ``finalize``, ``cutover`` (operations.cutover); ``stage``
is the first three, what ``hotpatch prepare`` runs. The cleanup of an
edition is its unmapping after a revert (operations.cleanup). Everything up to the cutover runs while the
target runs (only one thread pauses, a few µs per injected syscall), and
nothing in the target can reach the new code until the cutover writes the
trampolines. The cutover's stopped window only writes bytes computed before
it.

Order of writes (why a tool killed at any instant harms nothing):

1. prepare maps the edition's region and writes its record in state
   ``preparing``. Killed before/after: an unreachable region; ``recover``
   (or abort) unmaps it.
2. link/finalize write the image, stubs and the record's JSON, then state
   ``prepared``. Still unreachable; the record lists every trampoline with
   its old and new bytes.
3. cutover, inside ONE stopped window and ONE batch of pwrites: state
   ``switching``, every trampoline, state ``applied``. Killed between two of
   those writes, the record says ``switching`` and lists old/new bytes for
   every function, so the next invocation can tell exactly which trampolines
   are in and finish or undo the switch (issue #3 recovery).
4. revert mirrors it: state ``reverting``, original bytes, then the region is
   unmapped (which also removes the record).
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from . import editions as ed
from . import clobbers, clones, harness, ifuncs, interrupts, loader, placement, quiescence, runout, trampoline, x86writer
from .consistency import Consistency, check_no_reentry
from .constants import (EEXIST, MAP_FIXED_NOREPLACE, MAP_PRIVATE, MFD_CLOEXEC, PAGE_SIZE, PROT_EXEC, PROT_READ,
                        page_up, syscall_failed)
from . import operations
from .errors import (BuildIdMismatch, HotpatchError, PatchMismatch, RemoteError, TargetGone,
                     TrampolineError)
from .lifecycle import Direction, State
from .maps import Mapping
from .patchfile import Import, PatchFile, Replacement
from .symbols import Symbol
from .target import Target
from .tracer import Injector
from .transition import AttemptResult, Transition

STUB_SLOT = 128  # per function: far jump (14) + call-original stub (bounded below)
# per function, when its callers rely on registers the replacement writes (-fipa-ra)
THUNK_SLOT = (x86writer.preserving_thunk_bound(len(clobbers.GPRS), len(clobbers.XMMS)) + 15) & ~15


@dataclass(frozen=True)
class HarnessChoice:
    """What the user asked for: --harness NAME..., --no-harness, --force."""

    names: tuple[str, ...] = ()
    disabled: bool = False
    force: bool = False

    def select(self, touched: dict[str, str | None]) -> list[harness.Harness]:
        return harness.select(touched, list(self.names), self.disabled, self.force)


@dataclass
class Switch:
    """One function being redirected by this patch."""

    rep: Replacement
    sym: Symbol
    code: trampoline.FunctionCode
    new_addr: int = 0
    stub_addr: int | None = None  # call-original stub (WRAP)
    far_stub: int | None = None  # abs-jump slot when the new code is out of rel32 reach
    redirect: trampoline.Redirect | None = None
    preserve: frozenset[str] = frozenset()  # registers callers rely on that the new code writes
    thunk_addr: int | None = None  # saves `preserve` around the new code

    @property
    def entry(self) -> int:
        """Where the redirect sends callers: the thunk, else the new code."""
        return self.thunk_addr or self.new_addr


@dataclass
class Region:
    name: str
    size: int
    anchors: list[int]  # addresses it must be reachable from
    start: int = 0
    stub_cursor: int = 0  # next free stub slot (absolute, set once mapped)
    runout: int = 0  # bytes at the end reserved for run-out copies (runout.py; main region)

    @property
    def runout_area(self) -> tuple[int, int] | None:
        return (self.start + self.size - self.runout, self.runout) if self.runout else None

    def take_slot(self, size: int = STUB_SLOT) -> int:
        slot = self.stub_cursor
        self.stub_cursor += size
        return slot


class PatchCycle:
    """One patch on one process. Use ``run()`` for the whole cycle. Each
    phase that writes into the target first re-checks that the pid still
    names the process attached to (identity.py); an abort never unmaps in
    a process that is no longer ours."""

    def __init__(self, target: Target, patch: PatchFile, staged: bool = False,
                 harnesses: HarnessChoice | None = None) -> None:
        self.staged = staged
        self.harness_choice = harnesses or HarnessChoice()
        self.target = target
        self.patch = patch
        self.pid = target.pid
        self.mem = target.mem
        self.switches: list[Switch] = []
        self.symbol_refs: list[tuple[int, Symbol]] = []
        self.bind_targets: dict[str, int] = {}
        self.regions: list[Region] = []
        self.edition: ed.Edition | None = None
        self.image: loader.LinkedImage | None = None
        self.edition_id = 0
        self.record_size = 0
        self.image_base = 0
        self._maps: list[Mapping] = []
        self._bound: dict[tuple, int | None] = {}
        self._mapped = False
        self._ifunc_candidates: dict[str, dict[int, list[Symbol]]] = {}  # per object

    # -- prepare --------------------------------------------------------------
    def prepare(self) -> None:
        """Resolve everything and map the edition's memory into the target."""
        self.target.verify("preparing the patch")
        syms = self.target.symbols
        self._check_pins()
        seen: dict[int, str] = {}
        switches: list[tuple[Replacement, Symbol, trampoline.FunctionCode]] = []
        for rep in self.patch.replacements:
            sym = syms.resolve(rep.target)
            self._refuse_wrong_target(rep, sym)
            if sym.addr in seen:
                raise PatchMismatch(f"{rep.target} and {seen[sym.addr]} are the same function; replace it once")
            seen[sym.addr] = rep.target
            code = self._read_function(sym)
            # Refuse before mapping anything: exit 4 with the target untouched.
            trampoline.check_window(code, x86writer.JMP_REL32_LEN)
            switches.append((rep, sym, code))
        # A missing import is the plainer refusal: say it before any ABI analysis.
        for imp in self.patch.imports:
            if not imp.weak and self._bind(imp) is None:
                raise loader.missing_import(self.patch, imp)
        for rep, sym, code in switches:
            self.switches.append(Switch(rep, sym, code, preserve=self._callers_rely_on(rep, sym, code)))
        for ref in self.patch.symbol_refs:
            self.symbol_refs.append((ref.ptr, syms.resolve(ref.target)))
        self.bind_targets = {b.target: syms.resolve(b.target).addr for b in self.patch.binds}
        objects = [syms.object(sw.sym.object) for sw in self.switches]
        # harnesses govern an object by file name or SONAME
        chosen = self.harness_choice.select({n: o.build_id for o in objects for n in o.names})
        self._plan_regions()
        self._check_fits()  # the last step before the first write
        self._map_regions()
        self.edition = ed.Edition(  # the absolute path: how every audit record names it
            id=self.edition_id, patch=os.path.abspath(self.patch.name), sha256=self.patch.sha256,
            regions=[(r.start, r.size) for r in self.regions],
            pins={p.object: p.build_id for p in self.patch.pins}, prepared_at=time.time(),
            staged=self.staged, harnesses=[h.name for h in chosen],
            consistency=self.patch.consistency.value, runout=self.regions[0].runout_area)
        self._write_record()

    def _refuse_wrong_target(self, rep: Replacement, sym: Symbol) -> None:
        """Refuse what would be a success that does nothing (the vDSO, an
        IFUNC resolver or an implementation it did not pick) or a silently
        wrong one (a gcc clone with another ABI)."""
        syms = self.target.symbols
        ifuncs.refuse_vdso(syms, sym)
        if sym.kind == "ifunc":
            ifuncs.refuse_resolver(syms, sym)
        if sym.kind != "func":
            raise PatchMismatch(f"{sym.qualified} is not a function; it cannot be replaced")
        clones.refuse_undeclared(sym.qualified, rep.target, rep.clone_abi)
        if sym.object not in self._ifunc_candidates:
            self._ifunc_candidates[sym.object] = ifuncs.candidates(syms, sym.object, self.mem.read)
        ifuncs.refuse_unselected(syms, sym, self._ifunc_candidates[sym.object].get(sym.addr, []))

    def _check_pins(self) -> None:
        for pin in self.patch.pins:
            actual = self.target.symbols.build_id(pin.object)
            if actual != pin.build_id:
                raise BuildIdMismatch(
                    f"patch was built for {pin.object} build-id {pin.build_id}, "
                    f"but process {self.pid} has {actual or 'no build-id'}; rebuild the patch for this build")

    def _read_function(self, sym: Symbol) -> trampoline.FunctionCode:
        size = min(sym.size, 1 << 20)
        code = self.mem.read(sym.addr, size) if size else b""
        return trampoline.FunctionCode(sym.qualified, sym.addr, sym.size, code)

    def _callers_rely_on(self, rep: Replacement, sym: Symbol, code: trampoline.FunctionCode) -> frozenset[str]:
        """Call-clobbered registers the callers of ``sym`` may keep values in
        across calls (gcc -fipa-ra: the original never writes them) that the
        replacement may write: a thunk must preserve them. Refuses when it
        cannot stand in front of the function (clobbers.py)."""
        syms = self.target.symbols
        if not syms.binds_locally(sym):
            return frozenset()
        kept = clobbers.preserved_by(sym.addr, self._function_extent, syms.in_plt)
        seg = next((g for g in self.patch.segments
                    if g.vaddr <= rep.func < g.vaddr + len(g.data)), None)
        if not kept or seg is None:
            return frozenset()
        written = clobbers.written_by(
            rep.func, lambda a, n: seg.data[a - seg.vaddr:a - seg.vaddr + n],
            (seg.vaddr, seg.vaddr + len(seg.data)))
        needed = kept & written
        why = None
        if needed:  # the original may ignore stack arguments its replacement reads
            why = (clobbers.takes_stack_arguments(code.code, sym.addr)
                   or clobbers.takes_stack_arguments(seg.data[rep.func - seg.vaddr:], rep.func))
        if why:
            raise TrampolineError(
                f"cannot replace {sym.qualified}: its callers may keep values in "
                f"{clobbers.describe(needed)} across calls to it (gcc -fipa-ra: it never writes "
                f"them), the replacement may write them, and a thunk preserving them cannot "
                f"stand in front of it, as it may take stack arguments ({why}); a replacement "
                f"that leaves those registers alone needs no thunk", func=sym.qualified)
        return needed

    def _function_extent(self, addr: int) -> tuple[int, bytes] | None:
        f = self.target.symbols.function_at(addr)
        if f is None or not f.size:
            return None
        return f.addr, self.mem.read(f.addr, min(f.size, 1 << 20))

    def _plan_regions(self) -> None:
        maps = self.target.maps()
        self.edition_id = ed.next_id(maps)
        lo, hi = self.patch.span
        nfuncs = len(self.switches)
        clusters = placement.cluster([s.sym.addr for s in self.switches]) or [[0]]
        main = max(clusters, key=len)
        self.record_size = ed.record_size(nfuncs)
        image_size = page_up(hi - lo)
        stub_size = self._stub_area(nfuncs)
        # The image must also reach what its Bind32 fields name (PC-relative).
        anchors = [*main, *self.bind_targets.values()]
        self.regions = [Region(ed.region_name(self.edition_id, os.path.basename(self.patch.name)),
                               self.record_size + image_size + stub_size, anchors)]
        for c in clusters:
            if c is not main:
                self.regions.append(Region(ed.region_name(self.edition_id, "", stubs=True),
                                           self._stub_area(len(c)), c))
        self._maps = maps

    @staticmethod
    def _stub_area(nfuncs: int) -> int:
        # per function: a far jump, a call-original stub, a register-preserving thunk
        return page_up((2 * STUB_SLOT + THUNK_SLOT) * max(1, nfuncs))

    def _check_fits(self) -> None:
        """Decide everything the patch and the target's symbols and maps can
        decide, before anything is written (or even attached): every region
        has room within reach, every import binds, every wrap's prologue
        relocates, every trampoline plans. A patch that does not fit is
        refused with the target never touched. The dry run is link's and
        finalize's own planning code, at the addresses mmap is asked for."""
        for region in self.regions:
            found = placement.candidates(self._maps, region.anchors, region.size)
            if not found and self.switches:
                raise TrampolineError(
                    f"no free address range within 2 GiB of {region.anchors[0]:#x} in process "
                    f"{self.pid} for the patch's code")
            region.start = found[0] if found else PAGE_SIZE << 8
        self._layout()
        writes = self._build()
        for sw in self.switches:
            trampoline.plan_redirect(sw.code, sw.entry, near_stub=sw.far_stub)
        self._reserve_runout(writes)
        for region in self.regions:
            region.start = 0

    def _reserve_runout(self, writes: list[tuple[int, bytes]]) -> None:
        """Room in the main region for the run-out copy (hot functions,
        runout.py) of either direction: the original functions, or the
        new code and stubs (plus the trampolines and far jumps finalize
        adds). Sized from the dry run's bytes; none if it would be huge."""
        main = self.regions[0]
        originals = [(sw.sym.addr, sw.code.code) for sw in self.switches]
        for sw in self.switches:
            originals += [(r.start, self.mem.read(r.start, r.end - r.start))
                          for r in quiescence.split_parts(self.target.symbols, sw.sym.qualified)]
        executable = [(a, n) for a, n, prot in self.image.protections if prot & PROT_EXEC]
        stubs = self._stubs_start()  # no run-out area reserved yet
        new = [(addr, data) for addr, data in writes
               if any(a <= addr < a + n for a, n in executable) or stubs <= addr < main.start + main.size]
        main.runout = runout.area_size(originals, new, len(self.switches))
        if main.runout and not placement.candidates(self._maps, main.anchors, main.size + main.runout):
            main.runout = 0  # no room for it near the code: hot threads are waited for
        main.size += main.runout

    def _stubs_start(self) -> int:
        """Where the main region's stub area begins: before its run-out area, at its end."""
        main = self.regions[0]
        return main.start + main.size - main.runout - self._stub_area(len(self.switches))

    def _map_regions(self) -> None:
        with self.target.injector() as inj:
            for region in self.regions:
                region.start = self._map_one(inj, region)
                self._mapped = True
        self._layout()

    def _layout(self) -> None:
        main = self.regions[0]
        self.image_base = main.start + self.record_size - self.patch.span[0]
        main.stub_cursor = self._stubs_start()
        for r in self.regions[1:]:
            r.stub_cursor = r.start

    def _map_one(self, inj: Injector, region: Region) -> int:
        # The memfd's name is what /proc/PID/maps shows for the region.
        name_addr = inj.scratch
        self.mem.write(name_addr, region.name.encode() + b"\0")
        fd = inj.checked("memfd_create", name_addr, MFD_CLOEXEC)
        try:
            inj.checked("ftruncate", fd, region.size)
            for hint in placement.candidates(self._maps, region.anchors, region.size)[:16] or [0]:
                flags = MAP_PRIVATE | (MAP_FIXED_NOREPLACE if hint else 0)
                addr = inj("mmap", hint, region.size, PROT_READ, flags, fd, 0)
                if addr == -EEXIST:
                    continue  # raced with the target's own mmap; next gap
                if syscall_failed(addr):
                    raise RemoteError(f"mmap in process {self.pid} failed: {os.strerror(-addr)}")
                if hint and addr != hint:  # old kernel without NOREPLACE: a mere hint
                    inj("munmap", addr, region.size)
                    continue
                return addr
            raise RemoteError(f"no free address range near the patched code in process {self.pid}")
        finally:
            inj("close", fd)

    # -- link (the design's "apply" phase) --------------------------------------
    def link(self) -> None:
        """Link the image, build stubs, fill pointers; write it all. Nothing
        in the target can reach any of it yet."""
        self.target.verify("loading the patch")
        for addr, data in self._build():
            self.mem.write(addr, data)
        self._protect()

    def _build(self) -> list[tuple[int, bytes]]:
        """Link the image and plan the stubs and pointers for the regions'
        addresses: every byte link writes, computed without writing."""
        self.image = loader.link(self.patch, self.image_base, self._bind, self.bind_targets)
        pointer_writes: list[tuple[int, bytes]] = []
        for sw in self.switches:
            sw.far_stub = sw.stub_addr = sw.thunk_addr = None  # the dry run's, if any
            sw.new_addr = self.image.addr(sw.rep.func)
            region = self._near_region(sw.sym.addr)
            if sw.preserve:
                sw.thunk_addr = region.take_slot(THUNK_SLOT)
                pointer_writes.append((sw.thunk_addr, self._thunk(sw)))
            if not x86writer.fits_rel32(sw.sym.addr + x86writer.JMP_REL32_LEN, sw.entry):
                sw.far_stub = region.take_slot()
            if sw.rep.kind == "wrap":
                sw.stub_addr = region.take_slot()
                if trampoline.call_original_size_bound(sw.code) > STUB_SLOT:
                    raise TrampolineError(f"cannot wrap {sw.code.name}: its prologue is too long to relocate")
                stub = trampoline.plan_call_original(sw.code, sw.stub_addr)
                pointer_writes.append((sw.stub_addr, stub))
                if sw.rep.orig_ptr is None:
                    raise PatchMismatch(f"wrap of {sw.rep.target} has no original pointer")
                pointer_writes.append((self.image.addr(sw.rep.orig_ptr), struct.pack("<Q", sw.stub_addr)))
        for ptr, sym in self.symbol_refs:
            pointer_writes.append((self.image.addr(ptr), struct.pack("<Q", sym.addr)))
        return [*self.image.writes, *pointer_writes]

    @staticmethod
    def _thunk(sw: Switch) -> bytes:
        gprs = [r for r in clobbers.GPRS if r in sw.preserve]
        xmms = [i for i, r in enumerate(clobbers.XMMS) if r in sw.preserve]
        return x86writer.preserving_thunk(sw.thunk_addr, sw.new_addr, gprs, xmms)

    def _bind(self, imp: Import) -> int | None:
        key = (imp.name, imp.version, imp.weak)
        if key not in self._bound:  # once: the dry run's bindings serve link
            self._bound[key] = self.target.symbols.bind_import(imp.name, imp.version, imp.weak)
        return self._bound[key]

    def _near_region(self, addr: int) -> Region:
        for r in self.regions:
            if placement.reachable(r.start, addr) and placement.reachable(r.start + r.size, addr):
                return r
        raise TrampolineError(f"no stub memory within reach of {addr:#x}")

    def _protect(self) -> None:
        """Final page protections: W^X, RELRO read-only, stubs r-x."""
        calls = [(a, s, p) for a, s, p in self.image.protections]
        main = self.regions[0]
        stubs_start = self._stubs_start()
        calls.append((stubs_start, main.start + main.size - stubs_start, PROT_READ | PROT_EXEC))  # + run-out
        for r in self.regions[1:]:
            calls.append((r.start, r.size, PROT_READ | PROT_EXEC))
        with self.target.injector() as inj:
            for addr, size, prot in calls:
                if size:
                    inj.checked("mprotect", addr, size, prot)

    # -- finalize -------------------------------------------------------------
    def finalize(self) -> None:
        """Compute and validate every trampoline; precompute the cutover's
        writes; record the edition as ``prepared``."""
        self.target.verify("finalizing the patch")
        for sw in self.switches:
            sw.code = self._read_function(sw.sym)  # fresh: an edition may have landed
            sw.redirect = trampoline.plan_redirect(sw.code, sw.entry, near_stub=sw.far_stub)
            if self.patch.consistency is Consistency.NEW_CALLS:
                check_no_reentry(sw.code.name, sw.code.addr, sw.code.code[:sw.code.size], len(sw.redirect.old))
            if sw.redirect.stub_addr is not None:
                self.mem.write(sw.redirect.stub_addr, sw.redirect.stub)
        self.edition.functions = [
            ed.FunctionSwitch(
                target=sw.rep.target, symbol=sw.sym.qualified, kind=sw.rep.kind,
                addr=sw.sym.addr, size=sw.sym.size, new_addr=sw.new_addr,
                old_bytes=sw.redirect.old.hex(), new_bytes=sw.redirect.new.hex(),
                stub_addr=sw.stub_addr)
            for sw in self.switches]
        self.edition.move(State.PREPARED)
        self._write_record()

    def _write_record(self) -> None:
        e = self.edition
        body = e.body()
        if ed.HEADER.size + len(body) > self.record_size:
            raise HotpatchError("edition record does not fit its reserved space")
        self.mem.write(e.record_addr + ed.HEADER.size, body)
        self.mem.write(e.record_addr, e.header())

    def stage(self) -> ed.Edition:
        """prepare, link, finalize: the edition is ``prepared``, unreachable."""
        self.prepare()
        self.link()
        self.finalize()
        return self.edition

    # -- cutover ---------------------------------------------------------------
    def cutover(self, timeout: float) -> ed.Edition:
        """Switch in one stopped window, retried with back-off (transition.py)."""
        operations.cutover(self.target, self.edition, timeout)
        return self.edition

    # -- check / abort --------------------------------------------------------
    def probe(self) -> AttemptResult:
        """One quiescence probe without writing (``hotpatch check``)."""
        return Transition(self.target, self.edition, Direction.PATCH).probe()

    def abort(self) -> None:
        """Before cutover: unmap what prepare mapped; the target is as before.
        Never into whoever has the pid now: that memory went with our process."""
        if self._mapped:
            try:
                operations.abort(self.target, [(r.start, r.size) for r in self.regions], self.edition)
            except TargetGone:  # PidReused too: that memory is not ours to unmap
                pass
        self._mapped = False

    # -- the whole cycle ------------------------------------------------------
    def run(self, timeout: float) -> ed.Edition:
        try:
            self.stage()
            return self.cutover(timeout)
        except BaseException:
            # Any failure before the switch (including Ctrl-C/SIGTERM): undo.
            # After it, the new code is live: never unmap it.
            with interrupts.held():  # a second Ctrl-C must not cut the undo short
                if not self.switched():
                    self.abort()
            raise

    def switched(self) -> bool:
        """Did the cutover write its trampolines? Asked of the target itself
        (they are written all or nothing, in one stopped window), so the
        answer holds whatever was interrupted on our side."""
        if self.edition is None or not self.edition.functions:
            return False  # not finalized: nothing can have been switched
        try:
            return any(self.mem.read(f.addr, len(bytes.fromhex(f.new_bytes))) == bytes.fromhex(f.new_bytes)
                       for f in self.edition.functions)
        except HotpatchError:
            return self.target.same_process()  # unreadable yet ours: leave it for recover
