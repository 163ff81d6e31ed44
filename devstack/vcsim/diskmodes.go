package main

// Side-channel endpoints for what real VMs have and the stock simulator does not model: disks a
// snapshot does not capture (independent disks, physical-compatibility RDMs) and the
// "consolidation needed" state a failed snapshot removal leaves behind, with
// ConsolidateVMDisks_Task to clear it.

import (
	"fmt"
	"net/http"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type diskModeReq struct {
	// DiskMode is the backing's diskMode: persistent, independent_persistent,
	// independent_nonpersistent, ...
	DiskMode string `json:"disk_mode"`
	// RDM turns the backing into a raw device mapping: "physical" (physicalMode) or
	// "virtual" (virtualMode); "" keeps the flat backing.
	RDM string `json:"rdm"`
}

// setDiskMode changes one disk's backing in place, under the VM's lock, as an administrator
// would with a reconfigure: the diskMode, or an RDM backing (VirtualDiskRawDiskMappingVer1
// BackingInfo with compatibilityMode physicalMode/virtualMode) that keeps the file name, uuid
// and data. Change tracking of a disk that is no longer captured is dropped.
func (s *sideChannel) setDiskMode(w http.ResponseWriter, r *http.Request) {
	var req diskModeReq
	err := decode(r, &req)
	key, kerr := pathKey(r)
	if err == nil {
		err = kerr
	}
	var vm *simulator.VirtualMachine
	if err == nil {
		vm, err = s.lookupVM(r.PathValue("vm"))
	}
	if err == nil {
		ctx := s.ctx()
		ctx.Map.WithLock(ctx, vm, func() { err = s.cbt.setDiskMode(ctx, vm, key, req) })
	}
	if err != nil {
		reply(w, nil, err)
		return
	}
	info, err := s.describe(r.PathValue("vm"))
	reply(w, info, err)
}

func (c *CBT) setDiskMode(ctx *simulator.Context, vm *simulator.VirtualMachine, key int32, req diskModeReq) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	disk := findDisk(vm.Config.Hardware.Device, key)
	if disk == nil {
		return fmt.Errorf("%w: no disk with key %d", errNotFound, key)
	}
	flat, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	if !ok {
		return fmt.Errorf("%w: disk %d already has a non-flat backing", errBadRequest, key)
	}
	mode := req.DiskMode
	if mode == "" {
		mode = flat.DiskMode
	}
	switch types.VirtualDiskMode(mode) {
	case types.VirtualDiskModePersistent, types.VirtualDiskModeNonpersistent, types.VirtualDiskModeUndoable,
		types.VirtualDiskModeIndependent_persistent, types.VirtualDiskModeIndependent_nonpersistent, types.VirtualDiskModeAppend:
	default:
		return fmt.Errorf("%w: unknown disk mode %q", errBadRequest, mode)
	}
	switch req.RDM {
	case "":
		flat.DiskMode = mode
	case "physical", "virtual":
		compat := types.VirtualDiskCompatibilityModePhysicalMode
		if req.RDM == "virtual" {
			compat = types.VirtualDiskCompatibilityModeVirtualMode
		}
		disk.Backing = &types.VirtualDiskRawDiskMappingVer1BackingInfo{
			VirtualDeviceFileBackingInfo: flat.VirtualDeviceFileBackingInfo,
			LunUuid:                      "0200000000" + flat.Uuid,
			DeviceName:                   fmt.Sprintf("/vmfs/devices/disks/naa.6000c29%d", key),
			CompatibilityMode:            string(compat),
			DiskMode:                     mode,
			Uuid:                         flat.Uuid,
			ChangeId:                     flat.ChangeId,
		}
	default:
		return fmt.Errorf("%w: rdm must be physical, virtual or empty", errBadRequest)
	}
	if t := c.disks[diskID{vm.Self.Value, key}]; t != nil && !captured(disk) {
		t.stamps, t.epoch, t.gen = map[int64]int64{}, "", 0
		setChangeID(disk, "")
	}
	return nil
}

type consolidationReq struct {
	Needed bool `json:"needed"`
}

// setConsolidationNeeded sets runtime.consolidationNeeded, as ESXi does when removing a
// snapshot left delta disks behind.
func (s *sideChannel) setConsolidationNeeded(w http.ResponseWriter, r *http.Request) {
	var req consolidationReq
	err := decode(r, &req)
	var vm *simulator.VirtualMachine
	if err == nil {
		vm, err = s.lookupVM(r.PathValue("vm"))
	}
	if err == nil {
		ctx := s.ctx()
		// Set in place, as the side channel's other edits are (its context has no session
		// for ctx.Update); PropertyCollector reads see it at once.
		ctx.Map.WithLock(ctx, vm, func() { vm.Runtime.ConsolidationNeeded = types.NewBool(req.Needed) })
	}
	reply(w, map[string]bool{"consolidation_needed": req.Needed}, err)
}

// ConsolidateVMDisks merges leftover delta disks (here: clears runtime.consolidationNeeded).
func (vm *cbtVM) ConsolidateVMDisksTask(ctx *simulator.Context, _ *types.ConsolidateVMDisks_Task) soap.HasFault {
	self := vm.VirtualMachine
	task := simulator.CreateTask(self, "consolidateVMDisks", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		ctx.WithLock(self, func() { self.Runtime.ConsolidationNeeded = types.NewBool(false) })
		return nil, nil
	})
	return &methods.ConsolidateVMDisks_TaskBody{Res: &types.ConsolidateVMDisks_TaskResponse{Returnval: task.Run(ctx)}}
}

func (p *cbtProxy) ConsolidateVMDisksTask(ctx *simulator.Context, req *types.ConsolidateVMDisks_Task) soap.HasFault {
	res, fault := p.with(ctx, req.This, func(vm *cbtVM) soap.HasFault { return vm.ConsolidateVMDisksTask(ctx, req) })
	if fault != nil {
		return &methods.ConsolidateVMDisks_TaskBody{Fault_: fault}
	}
	return res
}
