package main

// CBT state of the simulator: per-disk tracking, frozen snapshot images and the
// QueryChangedDiskAreas implementation. Locking order: a simulator object lock (taken by the SOAP
// dispatcher or WithLock) may be held while taking cbt.mu, never the other way round.

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type diskTrack struct {
	file      string // "[LocalDS_0] vm/disk.vmdk"
	flat      string // local path of the flat extent the guest writes to
	capacity  int64
	epoch     string // "" when change tracking is off
	gen       int64
	stamps    map[int64]int64    // block -> generation of its last write (this epoch)
	allocated map[int64]struct{} // blocks ever written ("*" answers these)
}

type frozenDisk struct {
	key       int32
	file      string // the disk's backing fileName in the snapshot's config ("[ds] vm/x.vmdk")
	changeID  string // "" when the snapshot was taken with CBT off
	epoch     string
	gen       int64
	capacity  int64
	stamps    map[int64]int64
	allocated []int64
	image     string // frozen image path; its base name is the NBD export name
}

type frozenSnapshot struct {
	vm    types.ManagedObjectReference
	disks map[int32]*frozenDisk
}

type diskID struct {
	vm  string
	key int32
}

// CBT holds every piece of change-tracking state of the simulator.
type CBT struct {
	mu        sync.Mutex
	frozenDir string
	maxRange  int64
	maxAreas  int
	tracking  map[string]bool // vm moref -> CBT enabled (our truth; config follows)
	disks     map[diskID]*diskTrack
	pending   map[string][]*frozenSnapshot // vm moref -> frozen, waiting for their snapshot object
	snapshots map[string]*frozenSnapshot   // snapshot moref -> frozen disks
	switches  map[string]bool              // vm moref -> CBT state requested, waiting for a stun
	guest     *guests                      // tools and shutdown behaviour of the guests (guest.go)
}

func newCBT(frozenDir string, maxRange int64, maxAreas int) *CBT {
	return &CBT{
		frozenDir: frozenDir,
		maxRange:  maxRange,
		maxAreas:  maxAreas,
		tracking:  map[string]bool{},
		disks:     map[diskID]*diskTrack{},
		pending:   map[string][]*frozenSnapshot{},
		snapshots: map[string]*frozenSnapshot{},
		switches:  map[string]bool{},
		guest:     newGuests(),
	}
}

// vmDisks lists the VirtualDisks of a VM config (caller holds the VM's lock).
func vmDisks(devices []types.BaseVirtualDevice) []*types.VirtualDisk {
	var out []*types.VirtualDisk
	for _, d := range devices {
		if disk, ok := d.(*types.VirtualDisk); ok {
			out = append(out, disk)
		}
	}
	return out
}

func diskFile(disk *types.VirtualDisk) string {
	if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
		return b.GetVirtualDeviceFileBackingInfo().FileName
	}
	return ""
}

// resolveFlat maps "[ds] path/x.vmdk" to the local "…/path/x-flat.vmdk" of that datastore.
func resolveFlat(ctx *simulator.Context, file string) (string, error) {
	p, err := parseDSPath(file)
	if err != nil {
		return "", err
	}
	for _, obj := range ctx.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		if ds.Name == p.Datastore {
			return simulator.VirtualDiskBackingFileName(filepath.Join(ds.Summary.Url, p.Path)), nil
		}
	}
	return "", fmt.Errorf("datastore %q not found", p.Datastore)
}

// track returns the tracking state of one disk of vm, creating or refreshing it from the VM's
// current config (a new backing file under the same key is a new disk; a grown capacity extends
// the flat file). Caller holds the VM's lock and c.mu.
func (c *CBT) track(ctx *simulator.Context, vm *simulator.VirtualMachine, disk *types.VirtualDisk) (*diskTrack, error) {
	id := diskID{vm.Self.Value, disk.Key}
	file := diskFile(disk)
	t := c.disks[id]
	if t == nil || t.file != file {
		flat, err := resolveFlat(ctx, file)
		if err != nil {
			return nil, err
		}
		t = &diskTrack{file: file, flat: flat, stamps: map[int64]int64{}, allocated: map[int64]struct{}{}}
		if c.isTracking(vm) && captured(disk) {
			t.epoch, t.gen = newEpoch(), 1
			setChangeID(disk, formatChangeID(t.epoch, 0))
		}
		c.disks[id] = t
	}
	if disk.CapacityInBytes != t.capacity {
		if err := ensureSize(t.flat, disk.CapacityInBytes); err != nil {
			return nil, err
		}
		t.capacity = disk.CapacityInBytes
	}
	return t, nil
}

func (c *CBT) isTracking(vm *simulator.VirtualMachine) bool {
	on, seen := c.tracking[vm.Self.Value]
	if !seen {
		on = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		c.tracking[vm.Self.Value] = on
	}
	return on
}

// setTracking handles ReconfigVM(changeTrackingEnabled). As on ESXi, the switch does not take
// effect at once: it waits for the VM's next stun (a snapshot create or remove), which is why
// VMware documents "reconfigure, then create and remove a snapshot" to activate CBT. Until then
// the disks keep their old tracking state (no change IDs after an enable, still change IDs after
// a disable); config.changeTrackingEnabled shows the requested state right away. Caller holds
// the VM's lock.
func (c *CBT) setTracking(vm *simulator.VirtualMachine, on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isTracking(vm) == on {
		delete(c.switches, vm.Self.Value)
		return
	}
	c.switches[vm.Self.Value] = on
}

// stun applies a pending CBT switch of vm (see setTracking): enabling starts a new epoch on
// every disk (voiding old change IDs, as a CBT reset does on ESXi); disabling forgets the
// history. A snapshot create stuns after its point in time is frozen, so the snapshot that
// activates CBT carries no change IDs yet. Caller holds the VM's lock.
func (c *CBT) stun(ctx *simulator.Context, vm *simulator.VirtualMachine) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	on, pending := c.switches[vm.Self.Value]
	if !pending {
		return nil
	}
	delete(c.switches, vm.Self.Value)
	c.tracking[vm.Self.Value] = on
	for _, disk := range vmDisks(vm.Config.Hardware.Device) {
		t, err := c.track(ctx, vm, disk)
		if err != nil {
			return err
		}
		t.stamps = map[int64]int64{}
		t.epoch, t.gen = "", 0
		changeID := ""
		if on && captured(disk) {
			t.epoch, t.gen = newEpoch(), 1
			changeID = formatChangeID(t.epoch, 0)
		}
		setChangeID(disk, changeID)
	}
	return nil
}

// pendingSwitch reports whether vm has a CBT switch waiting for its next stun.
func (c *CBT) pendingSwitch(vm *simulator.VirtualMachine) bool {
	_, pending := c.switches[vm.Self.Value]
	return pending
}

// resetDisk voids one disk's change tracking, as ESXi does for a single disk after a power loss
// ("Change tracking invalid; reinitializing") or corrupt CBT data: the disk gets a new epoch, so
// every change ID it handed out before is rejected, while the VM's other disks keep theirs.
// Caller holds the VM's lock.
func (c *CBT) resetDisk(ctx *simulator.Context, vm *simulator.VirtualMachine, key int32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	disk := findDisk(vm.Config.Hardware.Device, key)
	if disk == nil {
		return fmt.Errorf("%w: no disk with key %d", errNotFound, key)
	}
	if !c.isTracking(vm) {
		return fmt.Errorf("%w: change tracking is off for this VM", errBadRequest)
	}
	t, err := c.track(ctx, vm, disk)
	if err != nil {
		return err
	}
	if !captured(disk) {
		return fmt.Errorf("%w: disk %d is not tracked (independent or physical RDM)", errBadRequest, key)
	}
	t.stamps = map[int64]int64{}
	t.epoch, t.gen = newEpoch(), 1
	setChangeID(disk, formatChangeID(t.epoch, 0))
	return nil
}

// write stores guest data at offset of a disk and stamps the touched blocks. Caller holds the
// VM's lock (so the config cannot change under us).
func (c *CBT) write(ctx *simulator.Context, vm *simulator.VirtualMachine, key int32, offset int64, data []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	disk := findDisk(vm.Config.Hardware.Device, key)
	if disk == nil {
		return fmt.Errorf("%w: no disk with key %d", errNotFound, key)
	}
	t, err := c.track(ctx, vm, disk)
	if err != nil {
		return err
	}
	if offset < 0 || offset+int64(len(data)) > t.capacity {
		return fmt.Errorf("%w: write [%d, +%d) outside disk of %d bytes", errBadRequest, offset, len(data), t.capacity)
	}
	if len(data) == 0 {
		return nil
	}
	f, err := os.OpenFile(t.flat, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(data, offset); err != nil {
		return err
	}
	first, last := markBlocks(offset, int64(len(data)))
	for b := first; b <= last; b++ {
		t.allocated[b] = struct{}{}
		if t.epoch != "" {
			t.stamps[b] = t.gen
		}
	}
	return nil
}

// read returns live disk content (for tests comparing live and frozen data).
func (c *CBT) read(ctx *simulator.Context, vm *simulator.VirtualMachine, key int32, offset, length int64) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	disk := findDisk(vm.Config.Hardware.Device, key)
	if disk == nil {
		return nil, fmt.Errorf("%w: no disk with key %d", errNotFound, key)
	}
	t, err := c.track(ctx, vm, disk)
	if err != nil {
		return nil, err
	}
	if offset < 0 || length < 0 || offset+length > t.capacity {
		return nil, fmt.Errorf("%w: read outside disk", errBadRequest)
	}
	f, err := os.Open(t.flat)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, length)
	_, err = f.ReadAt(buf, offset)
	if err == io.EOF {
		err = nil
	}
	return buf, err
}

func findDisk(devices []types.BaseVirtualDevice, key int32) *types.VirtualDisk {
	for _, disk := range vmDisks(devices) {
		if disk.Key == key {
			return disk
		}
	}
	return nil
}

// freeze runs before CreateSnapshot: it copies every disk's data to an immutable image, records
// the block stamps, assigns the change IDs and opens a new generation. The live disks' backings
// carry the new change IDs, so the snapshot's config (copied from the VM by the simulator) gets
// them; snapshotCreated then deep-copies that config. Caller holds the VM's lock.
func (c *CBT) freeze(ctx *simulator.Context, vm *simulator.VirtualMachine) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	fs := &frozenSnapshot{vm: vm.Self, disks: map[int32]*frozenDisk{}}
	for _, disk := range vmDisks(vm.Config.Hardware.Device) {
		t, err := c.track(ctx, vm, disk)
		if err != nil {
			return err
		}
		if !captured(disk) {
			// Independent disks and physical RDMs are outside the snapshot: they keep
			// changing, have no change ID and no frozen image (no NBD export).
			continue
		}
		fd := &frozenDisk{key: disk.Key, file: diskFile(disk), epoch: t.epoch, gen: t.gen, capacity: t.capacity,
			stamps: make(map[int64]int64, len(t.stamps)), allocated: sortedBlocks(t.allocated)}
		for b, g := range t.stamps {
			fd.stamps[b] = g
		}
		if t.epoch != "" {
			fd.changeID = formatChangeID(t.epoch, t.gen)
			t.gen++
		}
		img, err := os.CreateTemp(c.frozenDir, ".freezing-*")
		if err != nil {
			return err
		}
		fd.image = img.Name()
		err = copyBlocks(t.flat, img, fd.allocated, t.capacity)
		_ = img.Close()
		if err != nil {
			return err
		}
		setChangeID(disk, fd.changeID)
		fs.disks[disk.Key] = fd
	}
	c.pending[vm.Self.Value] = append(c.pending[vm.Self.Value], fs)
	return nil
}

// unfreeze drops the oldest pending freeze of vm (its CreateSnapshot call failed).
func (c *CBT) unfreeze(vm types.ManagedObjectReference) {
	c.mu.Lock()
	defer c.mu.Unlock()
	q := c.pending[vm.Value]
	if len(q) == 0 {
		return
	}
	for _, fd := range q[len(q)-1].disks {
		_ = os.Remove(fd.image)
	}
	c.pending[vm.Value] = q[:len(q)-1]
}

// snapshotCreated binds the oldest pending freeze of the snapshot's VM to the new snapshot
// object, names the images after it, and gives the snapshot its own copy of every disk device
// (the simulator copies the config shallowly; later changes to the live VM must not leak in).
func (c *CBT) snapshotCreated(snap *simulator.VirtualMachineSnapshot) {
	c.mu.Lock()
	defer c.mu.Unlock()
	q := c.pending[snap.Vm.Value]
	if len(q) == 0 {
		return
	}
	fs := q[0]
	c.pending[snap.Vm.Value] = q[1:]
	c.snapshots[snap.Self.Value] = fs
	for key, fd := range fs.disks {
		final := filepath.Join(c.frozenDir, exportName(snap.Self.Value, key))
		if err := os.Rename(fd.image, final); err == nil {
			fd.image = final
		}
	}
	devices := make([]types.BaseVirtualDevice, len(snap.Config.Hardware.Device))
	for i, d := range snap.Config.Hardware.Device {
		devices[i] = d
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		cp := *disk
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			bc := *b
			if fd := fs.disks[disk.Key]; fd != nil {
				bc.ChangeId = fd.changeID
			}
			cp.Backing = &bc
		}
		devices[i] = &cp
	}
	snap.Config.Hardware.Device = devices
}

// snapshotRemoved deletes the frozen images of a removed snapshot (their NBD exports vanish).
// It returns the snapshot's VM, and false for a snapshot it never saw.
func (c *CBT) snapshotRemoved(ref types.ManagedObjectReference) (types.ManagedObjectReference, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fs := c.snapshots[ref.Value]
	if fs == nil {
		return types.ManagedObjectReference{}, false
	}
	for _, fd := range fs.disks {
		_ = os.Remove(fd.image)
	}
	delete(c.snapshots, ref.Value)
	return fs.vm, true
}

func exportName(snapshot string, key int32) string {
	return fmt.Sprintf("%s-disk-%d", snapshot, key)
}

// frozen returns the frozen disk of a snapshot, or nil.
func (c *CBT) frozen(snapshot string, key int32) (*frozenDisk, types.ManagedObjectReference) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fs := c.snapshots[snapshot]
	if fs == nil {
		return nil, types.ManagedObjectReference{}
	}
	return fs.disks[key], fs.vm
}

// frozenByFile returns the frozen disk of a snapshot of vm whose backing file (in the snapshot's
// config) is file: how VDDK names a disk (vm=moref=, snapshot=, file=). Nil when the snapshot
// is gone, belongs to another VM, or has no such disk.
func (c *CBT) frozenByFile(vm, snapshot, file string) *frozenDisk {
	c.mu.Lock()
	defer c.mu.Unlock()
	fs := c.snapshots[snapshot]
	if fs == nil || fs.vm.Value != vm {
		return nil
	}
	for _, fd := range fs.disks {
		if fd.file == file {
			return fd
		}
	}
	return nil
}

// captured reports whether a snapshot captures the disk. Independent disks (persistent or
// nonpersistent) are excluded from snapshots by definition, and a physical-compatibility RDM
// passes SCSI commands to the LUN, so ESXi can neither snapshot it nor track its changes.
func captured(disk *types.VirtualDisk) bool {
	switch b := disk.Backing.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		return !independent(b.DiskMode)
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		return b.CompatibilityMode != string(types.VirtualDiskCompatibilityModePhysicalMode) && !independent(b.DiskMode)
	}
	return true
}

func independent(mode string) bool {
	return mode == string(types.VirtualDiskModeIndependent_persistent) ||
		mode == string(types.VirtualDiskModeIndependent_nonpersistent)
}

// setChangeID sets backing.changeId on the backings that have one.
func setChangeID(disk *types.VirtualDisk, id string) {
	switch b := disk.Backing.(type) {
	case *types.VirtualDiskFlatVer2BackingInfo:
		b.ChangeId = id
	case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
		b.ChangeId = id
	}
}
