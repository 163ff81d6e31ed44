package main

// The guest's side of power operations, which the stock simulator does not model: whether
// VMware Tools is installed (then it runs while the VM is powered on, as on ESXi once the guest
// has booted), and how the guest answers ShutdownGuest. Stock vcsim reports tools "not running"
// forever yet powers the VM off on ShutdownGuest; ESXi refuses ShutdownGuest with
// ToolsUnavailable when tools are not running, returns at once otherwise, and the guest powers
// off when its OS is done, or never if it ignores the request (a hung guest).
//
// Locking: a VM's simulator lock may be held while taking guests.mu, never the other way round.

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// guestBehaviour is what the side channel says about one VM's guest.
type guestBehaviour struct {
	// Tools: VMware Tools installed; it runs while the VM is powered on.
	Tools bool `json:"tools"`
	// IgnoreShutdown: ShutdownGuest is accepted and nothing happens (a hung guest).
	IgnoreShutdown bool `json:"ignore_shutdown"`
	// ShutdownDelayMs: how long the guest OS takes to power off after ShutdownGuest.
	ShutdownDelayMs int `json:"shutdown_delay_ms"`
}

type guests struct {
	mu  sync.Mutex
	vms map[string]guestBehaviour // vm moref -> behaviour; absent: no tools, obeys
}

func newGuests() *guests {
	return &guests{vms: map[string]guestBehaviour{}}
}

func (g *guests) get(vm string) guestBehaviour {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.vms[vm]
}

func (g *guests) set(vm string, b guestBehaviour) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.vms[vm] = b
}

// toolsChanges are the property changes that make guest.toolsRunningStatus (and toolsStatus)
// agree with the behaviour and the power state; nil when they already do. Caller holds the VM's
// lock.
func (g *guests) toolsChanges(vm *mo.VirtualMachine, state types.VirtualMachinePowerState) []types.PropertyChange {
	b := g.get(vm.Self.Value)
	running := string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
	status := types.VirtualMachineToolsStatusToolsNotInstalled
	if b.Tools {
		status = types.VirtualMachineToolsStatusToolsNotRunning
		if state == types.VirtualMachinePowerStatePoweredOn {
			running = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
			status = types.VirtualMachineToolsStatusToolsOk
		}
	}
	if vm.Guest != nil && vm.Guest.ToolsRunningStatus == running && vm.Guest.ToolsStatus == status {
		return nil
	}
	return []types.PropertyChange{
		{Name: "guest.toolsRunningStatus", Val: running},
		{Name: "guest.toolsStatus", Val: status},
		{Name: "summary.guest.toolsRunningStatus", Val: running},
		{Name: "summary.guest.toolsStatus", Val: status},
	}
}

// powerChanged follows a runtime.powerState change of a VM (from the registry hook, with the
// VM's lock held by whoever updates it): tools start with the guest and stop with it.
func (g *guests) powerChanged(ctx *simulator.Context, obj mo.Reference, changes []types.PropertyChange) {
	moVM, ok := obj.(*mo.VirtualMachine)
	if !ok {
		return
	}
	for _, c := range changes {
		if c.Name != "runtime.powerState" {
			continue
		}
		state, ok := c.Val.(types.VirtualMachinePowerState)
		if !ok {
			return
		}
		vm, ok := ctx.Map.Get(moVM.Self).(*simulator.VirtualMachine)
		if !ok || vm.Guest == nil {
			return
		}
		if tc := g.toolsChanges(&vm.VirtualMachine, state); tc != nil {
			ctx.Update(vm, tc) // runtime.powerState is not among them: no recursion
		}
		return
	}
}

// ShutdownGuest as ESXi answers it: InvalidPowerState unless powered on, ToolsUnavailable
// unless tools run; otherwise accepted at once, and the guest powers off after its delay (or
// never when it ignores the request).
func (vm *cbtVM) ShutdownGuest(ctx *simulator.Context, req *types.ShutdownGuest) soap.HasFault {
	body := &methods.ShutdownGuestBody{}
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		body.Fault_ = simulator.Fault("", &types.InvalidPowerState{
			RequestedState: types.VirtualMachinePowerStatePoweredOn,
			ExistingState:  vm.Runtime.PowerState,
		})
		return body
	}
	if vm.Guest == nil || vm.Guest.ToolsRunningStatus != string(types.VirtualMachineToolsRunningStatusGuestToolsRunning) {
		body.Fault_ = simulator.Fault("VMware Tools is not running in the guest", new(types.ToolsUnavailable))
		return body
	}
	b := vm.cbt.guest.get(vm.Self.Value)
	switch {
	case b.IgnoreShutdown:
		body.Res = new(types.ShutdownGuestResponse)
		return body
	case b.ShutdownDelayMs <= 0:
		return vm.VirtualMachine.ShutdownGuest(ctx, req)
	}
	m, ref := ctx.Map, vm.Self
	time.AfterFunc(time.Duration(b.ShutdownDelayMs)*time.Millisecond, func() {
		// A context of our own: the request's is gone by now. No events are posted (they need
		// a session); the power state and tools status change as the stock shutdown's would.
		own := &simulator.Context{Context: context.Background(), Map: m}
		v, ok := m.Get(ref).(*simulator.VirtualMachine)
		if !ok {
			return
		}
		own.WithLock(v, func() {
			if v.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
				return
			}
			own.Update(v, []types.PropertyChange{
				{Name: "runtime.powerState", Val: types.VirtualMachinePowerStatePoweredOff},
				{Name: "summary.runtime.powerState", Val: types.VirtualMachinePowerStatePoweredOff},
			})
		})
	})
	body.Res = new(types.ShutdownGuestResponse)
	return body
}

func (p *cbtProxy) ShutdownGuest(ctx *simulator.Context, req *types.ShutdownGuest) soap.HasFault {
	res, fault := p.with(ctx, req.This, func(vm *cbtVM) soap.HasFault { return vm.ShutdownGuest(ctx, req) })
	if fault != nil {
		return &methods.ShutdownGuestBody{Fault_: fault}
	}
	return res
}

// setGuest is POST /cbt/vms/{vm}/guest: the guest's tools and shutdown behaviour. Tools take
// effect at once on a powered-on VM.
func (s *sideChannel) setGuest(w http.ResponseWriter, r *http.Request) {
	var req guestBehaviour
	err := decode(r, &req)
	if err == nil && req.ShutdownDelayMs < 0 {
		err = fmt.Errorf("%w: shutdown_delay_ms must not be negative", errBadRequest)
	}
	var vm *simulator.VirtualMachine
	if err == nil {
		vm, err = s.lookupVM(r.PathValue("vm"))
	}
	if err != nil {
		reply(w, nil, err)
		return
	}
	s.applyGuest(vm, req)
	info, err := s.describe(r.PathValue("vm"))
	reply(w, info, err)
}

func (s *sideChannel) applyGuest(vm *simulator.VirtualMachine, b guestBehaviour) {
	ctx := s.ctx()
	ctx.WithLock(vm, func() {
		s.cbt.guest.set(vm.Self.Value, b)
		if vm.Guest == nil {
			log.Printf("guest %s: no guest info", vm.Name)
			return
		}
		if tc := s.cbt.guest.toolsChanges(&vm.VirtualMachine, vm.Runtime.PowerState); tc != nil {
			ctx.Update(vm, tc)
		}
	})
}
