package main

// Hooks into govmomi's simulator. The documented extension is a wrapper type embedding
// *simulator.VirtualMachine (simulator/example_extend_test.go); putting such a wrapper into the
// registry would break the simulator's own `Map.Get(ref).(*VirtualMachine)` assertions (snapshot
// removal, for one), and Registry.Handler's returned object is overridden by the session lookup.
// So Registry.Handler re-targets the few VirtualMachine methods we add or extend to one proxy
// object registered in the map; the proxy looks the VM up, takes the VM's lock exactly as the
// dispatcher would, and calls cbtVM (the wrapper) on it. Everything else reaches the stock VM.
// A RegisterObject handler sees snapshots appear and disappear.

import (
	"fmt"
	"log"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	keyCannotGetChanges = "vim.hostd.vmsvc.cbt.cannotGetChanges"
	keyNoTrack          = "vim.hostd.vmsvc.cbt.noTrack"
)

var proxyRef = types.ManagedObjectReference{Type: "CbtProxy", Value: "cbt-proxy"}

type cbtVM struct {
	*simulator.VirtualMachine
	cbt *CBT
}

// cbtProxy receives the re-targeted calls; req.This still names the real VM.
// Its first field is an mo type because the simulator walks every registry object as one.
type cbtProxy struct {
	mo.ExtensibleManagedObject
	cbt *CBT
}

func (p *cbtProxy) Reference() types.ManagedObjectReference { return p.Self }

// with runs f on the wrapped VM under the VM's lock, or returns ManagedObjectNotFound.
func (p *cbtProxy) with(ctx *simulator.Context, ref types.ManagedObjectReference, f func(*cbtVM) soap.HasFault) (soap.HasFault, *soap.Fault) {
	vm, ok := ctx.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, simulator.Fault("managed object not found", &types.ManagedObjectNotFound{Obj: ref})
	}
	var res soap.HasFault
	ctx.WithLock(vm, func() { res = f(&cbtVM{VirtualMachine: vm, cbt: p.cbt}) })
	return res, nil
}

func (p *cbtProxy) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	res, fault := p.with(ctx, req.This, func(vm *cbtVM) soap.HasFault { return vm.QueryChangedDiskAreas(ctx, req) })
	if fault != nil {
		return &methods.QueryChangedDiskAreasBody{Fault_: fault}
	}
	return res
}

func (p *cbtProxy) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	res, fault := p.with(ctx, req.This, func(vm *cbtVM) soap.HasFault { return vm.CreateSnapshotTask(ctx, req) })
	if fault != nil {
		return &methods.CreateSnapshot_TaskBody{Fault_: fault}
	}
	return res
}

func (p *cbtProxy) CreateSnapshotExTask(ctx *simulator.Context, req *types.CreateSnapshotEx_Task) soap.HasFault {
	res, fault := p.with(ctx, req.This, func(vm *cbtVM) soap.HasFault { return vm.CreateSnapshotExTask(ctx, req) })
	if fault != nil {
		return &methods.CreateSnapshotEx_TaskBody{Fault_: fault}
	}
	return res
}

func (p *cbtProxy) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	res, fault := p.with(ctx, req.This, func(vm *cbtVM) soap.HasFault { return vm.ReconfigVMTask(ctx, req) })
	if fault != nil {
		return &methods.ReconfigVM_TaskBody{Fault_: fault}
	}
	return res
}

// install wires the hooks into the simulator's vim25 registry. Fault injection rules are
// checked here, against the VM's name, because after re-targeting the dispatcher would only see
// the proxy.
func (c *CBT) install(m *simulator.Registry, faults *simulator.FaultInjector) {
	proxy := &cbtProxy{cbt: c}
	proxy.Self = proxyRef
	m.Put(proxy)
	m.Handler = func(ctx *simulator.Context, method *simulator.Method) (mo.Reference, types.BaseMethodFault) {
		if method.This.Type != "VirtualMachine" {
			return nil, nil
		}
		switch method.Name {
		case "QueryChangedDiskAreas", "CreateSnapshot_Task", "CreateSnapshotEx_Task", "ReconfigVM_Task",
			"ConsolidateVMDisks_Task", "ShutdownGuest":
			if vm, ok := ctx.Map.Get(method.This).(*simulator.VirtualMachine); ok {
				if rule := faults.ShouldInjectFault(method, vm.Name); rule != nil {
					if f, ok := faults.CreateFault(rule, method).Fault().Detail.Fault.(types.BaseMethodFault); ok {
						return nil, f
					}
				}
			}
			method.This = proxyRef
			return proxy, nil
		}
		return nil, nil
	}
	m.AddHandler(&registryHook{cbt: c})
}

type registryHook struct{ cbt *CBT }

func (h *registryHook) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "CbtRegistryHook", Value: "cbt-hook"}
}

func (h *registryHook) PutObject(_ *simulator.Context, obj mo.Reference) {
	if snap, ok := obj.(*simulator.VirtualMachineSnapshot); ok {
		h.cbt.snapshotCreated(snap)
	}
}

// UpdateObject sees a VM's power state change: the guest's tools follow it (guest.go).
func (h *registryHook) UpdateObject(ctx *simulator.Context, obj mo.Reference, changes []types.PropertyChange) {
	h.cbt.guest.powerChanged(ctx, obj, changes)
}

// RemoveObject sees a snapshot go: its frozen images are deleted, and removing a snapshot is a
// stun of its VM (a pending CBT switch applies). The registry calls handlers without its lock
// and the snapshot task has released the VM's lock by now, so taking it here is safe.
func (h *registryHook) RemoveObject(ctx *simulator.Context, ref types.ManagedObjectReference) {
	if ref.Type != "VirtualMachineSnapshot" {
		return
	}
	owner, known := h.cbt.snapshotRemoved(ref)
	if !known {
		return
	}
	if vm, ok := ctx.Map.Get(owner).(*simulator.VirtualMachine); ok {
		ctx.WithLock(vm, func() {
			if err := h.cbt.stun(ctx, vm); err != nil {
				log.Printf("stun %s: %v", vm.Name, err)
			}
		})
	}
}

func (vm *cbtVM) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	if err := vm.cbt.freeze(ctx, vm.VirtualMachine); err != nil {
		return &methods.CreateSnapshot_TaskBody{Fault_: simulator.Fault(err.Error(), &types.FileFault{File: err.Error()})}
	}
	res := vm.VirtualMachine.CreateSnapshotTask(ctx, req)
	if res.Fault() != nil {
		vm.cbt.unfreeze(vm.Self)
		return res
	}
	if err := vm.cbt.stun(ctx, vm.VirtualMachine); err != nil {
		log.Printf("stun %s: %v", vm.Name, err)
	}
	return res
}

func (vm *cbtVM) CreateSnapshotExTask(ctx *simulator.Context, req *types.CreateSnapshotEx_Task) soap.HasFault {
	if err := vm.cbt.freeze(ctx, vm.VirtualMachine); err != nil {
		return &methods.CreateSnapshotEx_TaskBody{Fault_: simulator.Fault(err.Error(), &types.FileFault{File: err.Error()})}
	}
	res := vm.VirtualMachine.CreateSnapshotExTask(ctx, req)
	if res.Fault() != nil {
		vm.cbt.unfreeze(vm.Self)
		return res
	}
	if err := vm.cbt.stun(ctx, vm.VirtualMachine); err != nil {
		log.Printf("stun %s: %v", vm.Name, err)
	}
	return res
}

func (vm *cbtVM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	if req.Spec.ChangeTrackingEnabled != nil {
		vm.cbt.setTracking(vm.VirtualMachine, *req.Spec.ChangeTrackingEnabled)
	}
	return vm.VirtualMachine.ReconfigVMTask(ctx, req)
}

func cbtFault(key, msg, file string) types.BaseMethodFault {
	return &types.FileFault{
		VimFault: types.VimFault{MethodFault: types.MethodFault{
			FaultMessage: []types.LocalizableMessage{{Key: key, Message: msg}},
		}},
		File: file,
	}
}

func invalidArgument(prop string) types.BaseMethodFault {
	return &types.InvalidArgument{InvalidProperty: prop}
}

// QueryChangedDiskAreas answers from the snapshot's frozen CBT state. Faults follow ESXi:
// InvalidArgument for a missing snapshot argument, an unknown device key, an offset outside
// the disk or a malformed change ID; NotFound for a snapshot that no longer exists;
// FileFault(noTrack) when change tracking is off (now, or when the snapshot was taken);
// FileFault(cannotGetChanges) for a change ID of another epoch (CBT reset, another disk) or
// from the future.
func (vm *cbtVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	info, msg, fault := vm.query(req)
	if fault != nil {
		body.Fault_ = simulator.Fault(msg, fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

func (vm *cbtVM) query(req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, string, types.BaseMethodFault) {
	if req.Snapshot == nil {
		return nil, "snapshot argument required", invalidArgument("snapshot")
	}
	fd, owner := vm.cbt.frozen(req.Snapshot.Value, req.DeviceKey)
	if owner.Value == "" {
		return nil, "snapshot not found", &types.NotFound{}
	}
	if owner != vm.Self {
		return nil, "snapshot belongs to another VM", invalidArgument("snapshot")
	}
	if fd == nil {
		return nil, fmt.Sprintf("no disk with key %d", req.DeviceKey), invalidArgument("deviceKey")
	}
	if req.StartOffset < 0 || req.StartOffset >= fd.capacity {
		return nil, "startOffset outside the disk", invalidArgument("startOffset")
	}
	vm.cbt.mu.Lock()
	tracking := vm.cbt.isTracking(vm.VirtualMachine)
	vm.cbt.mu.Unlock()
	file := fmt.Sprintf("%s-disk-%d.ctk", vm.Name, req.DeviceKey)
	if !tracking || fd.changeID == "" {
		return nil, "change tracking is not enabled", cbtFault(keyNoTrack, "Change tracking is not active on the disk", file)
	}
	var blocks []int64
	if req.ChangeId == "*" {
		blocks = fd.allocated
	} else {
		epoch, seq, ok := parseChangeID(req.ChangeId)
		if !ok {
			return nil, "malformed change ID", invalidArgument("changeId")
		}
		if epoch != fd.epoch || seq > fd.gen {
			return nil, "cannot get changes for this change ID", cbtFault(keyCannotGetChanges,
				"Cannot compute changes for disk; change ID does not match the tracking state", file)
		}
		blocks = blocksSince(fd.stamps, seq)
	}
	length, areas := page(blocks, req.StartOffset, fd.capacity, vm.cbt.maxRange, vm.cbt.maxAreas)
	info := &types.DiskChangeInfo{StartOffset: req.StartOffset, Length: length}
	for _, a := range areas {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: a.Start, Length: a.Length})
	}
	return info, "", nil
}
