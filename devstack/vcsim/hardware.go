package main

// The hardware a side-channel VM is created with, beyond "one pvscsi controller and N disks":
// firmware and secure boot, CPUs, memory, guest OS, disks on other controllers (lsilogic, NVMe,
// SATA, IDE) and NICs on the inventory's networks, so the VM description a failover needs
// (cbtstream/vsphere) can be read back from a VM that looks like a real one. Everything goes
// through the stock CreateVM/ReconfigVM, so vcsim's own key, bus and MAC assignment applies.

import (
	"context"
	"fmt"
	"path"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/vim25/types"
)

type nicReq struct {
	// Adapter is govmomi's card name: e1000, e1000e, vmxnet3, vmxnet2, pcnet32 (default vmxnet3).
	Adapter string `json:"adapter"`
	// Network is a network or distributed portgroup name ("VM Network", "DC0_DVPG0").
	Network string `json:"network"`
	// MAC makes the address manual; "" lets the simulator generate one.
	MAC string `json:"mac"`
}

type hardwareReq struct {
	Firmware       string `json:"firmware"` // bios (default) or efi
	SecureBoot     bool   `json:"secure_boot"`
	GuestID        string `json:"guest_id"` // default otherGuest
	CPUs           int32  `json:"cpus"`
	CoresPerSocket int32  `json:"cores_per_socket"`
	MemoryMB       int64  `json:"memory_mb"`
	// Tools: VMware Tools installed in the guest (running while powered on; guest.go).
	Tools bool `json:"tools"`
	// DiskControllers names, per disk of Disks, the controller it sits on: pvscsi (default),
	// lsilogic, lsilogic-sas, buslogic, nvme, sata or ide. One controller of each kind.
	DiskControllers []string `json:"disk_controllers"`
	NICs            []nicReq `json:"nics"`
}

func (h *hardwareReq) apply(spec *types.VirtualMachineConfigSpec) {
	if h.Firmware != "" {
		spec.Firmware = h.Firmware
	}
	if h.SecureBoot {
		spec.BootOptions = &types.VirtualMachineBootOptions{EfiSecureBootEnabled: types.NewBool(true)}
	}
	if h.GuestID != "" {
		spec.GuestId = h.GuestID
	}
	spec.NumCPUs, spec.NumCoresPerSocket, spec.MemoryMB = h.CPUs, h.CoresPerSocket, h.MemoryMB
}

// laterDisk is a disk added by a reconfigure once the VM exists (IDE: vcsim adds its default
// IDE controllers itself, so they have no key before CreateVM).
type laterDisk struct {
	kind     string
	capacity int64
	file     string
}

// createDevices builds the controllers, disks and NICs of a new VM.
func (s *sideChannel) createDevices(ctx context.Context, finder *find.Finder, req createReq, ds *object.Datastore) (object.VirtualDeviceList, []laterDisk, error) {
	if len(req.DiskControllers) > len(req.Disks) {
		return nil, nil, fmt.Errorf("%w: more disk_controllers than disks", errBadRequest)
	}
	var devices object.VirtualDeviceList
	controllers := map[string]types.BaseVirtualController{}
	var later []laterDisk
	for i, c := range req.Disks {
		kind := "pvscsi"
		if i < len(req.DiskControllers) && req.DiskControllers[i] != "" {
			kind = req.DiskControllers[i]
		}
		file := fmt.Sprintf("[%s] %s", ds.Name(), path.Join(req.Name, fmt.Sprintf("%s_%d.vmdk", req.Name, i)))
		if kind == "ide" {
			later = append(later, laterDisk{kind: kind, capacity: c, file: file})
			continue
		}
		ctrl, ok := controllers[kind]
		if !ok {
			var dev types.BaseVirtualDevice
			var err error
			switch kind {
			case "nvme":
				dev, err = devices.CreateNVMEController()
			case "sata":
				dev, err = devices.CreateSATAController()
			default:
				dev, err = devices.CreateSCSIController(kind)
			}
			if err != nil {
				return nil, nil, fmt.Errorf("%w: controller %q: %v", errBadRequest, kind, err)
			}
			devices = append(devices, dev)
			ctrl = dev.(types.BaseVirtualController)
			controllers[kind] = ctrl
		}
		disk := devices.CreateDisk(ctrl, ds.Reference(), file)
		disk.CapacityInBytes, disk.CapacityInKB = c, c/1024
		devices = append(devices, disk)
	}
	for _, n := range req.NICs {
		net, err := finder.Network(ctx, n.Network)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: network %q: %v", errBadRequest, n.Network, err)
		}
		backing, err := net.EthernetCardBackingInfo(ctx)
		if err != nil {
			return nil, nil, err
		}
		adapter := n.Adapter
		if adapter == "" {
			adapter = "vmxnet3"
		}
		dev, err := devices.CreateEthernetCard(adapter, backing)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: %v", errBadRequest, err)
		}
		card := dev.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
		card.Connectable = &types.VirtualDeviceConnectInfo{StartConnected: true, AllowGuestControl: true}
		card.AddressType = string(types.VirtualEthernetCardMacTypeGenerated)
		if n.MAC != "" {
			card.MacAddress, card.AddressType = n.MAC, string(types.VirtualEthernetCardMacTypeManual)
		}
		devices = append(devices, dev)
	}
	return devices, later, nil
}

// addDiskOn adds a disk of `capacity` bytes backed by `file` on the VM's first controller of
// `kind` (only ide is needed: the other kinds are created with the VM).
func (s *sideChannel) addDiskOn(ctx context.Context, moref, kind string, capacity int64, file string) error {
	vm := object.NewVirtualMachine(s.client, types.ManagedObjectReference{Type: "VirtualMachine", Value: moref})
	devices, err := vm.Device(ctx)
	if err != nil {
		return err
	}
	if kind != "ide" {
		return fmt.Errorf("%w: cannot add a disk on a %s controller later", errBadRequest, kind)
	}
	ctrl, err := devices.FindIDEController("")
	if err != nil {
		return fmt.Errorf("%w: %v", errBadRequest, err)
	}
	disk := devices.CreateDisk(ctrl, types.ManagedObjectReference{}, file)
	disk.CapacityInBytes, disk.CapacityInKB = capacity, capacity/1024
	return s.reconfigure(ctx, moref, &types.VirtualDeviceConfigSpec{
		Operation:     types.VirtualDeviceConfigSpecOperationAdd,
		FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
		Device:        disk,
	})
}
