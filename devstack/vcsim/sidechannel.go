package main

// The test/demo side channel: JSON endpoints under /cbt/ on the simulator's own HTTPS port
// (127.0.0.1 only). It plays the guest (writes and reads disk data) and the administrator (VMs
// with N disks, add/resize disks, fault injection), and tells the copier where each snapshot
// disk is exported over NBD. It has no authentication: it exists only in the simulator.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// maxWrite bounds one guest write request (bigger writes are split by the client).
const maxWrite = 64 << 20

type sideChannel struct {
	cbt     *CBT
	model   *simulator.Model
	client  *vim25.Client // in-process client: goes through the same dispatcher and hooks
	nbdAddr string
}

func (s *sideChannel) register(mux *http.ServeMux) {
	mux.HandleFunc("GET /cbt/health", s.health)
	mux.HandleFunc("POST /cbt/vms", s.createVM)
	mux.HandleFunc("GET /cbt/vms/{vm}", s.getVM)
	mux.HandleFunc("POST /cbt/vms/{vm}/disks", s.addDisk)
	mux.HandleFunc("POST /cbt/vms/{vm}/disks/{key}/resize", s.resizeDisk)
	mux.HandleFunc("PUT /cbt/vms/{vm}/disks/{key}/data", s.writeData)
	mux.HandleFunc("POST /cbt/vms/{vm}/disks/{key}/cbt-reset", s.resetDiskCBT)
	mux.HandleFunc("GET /cbt/vms/{vm}/disks/{key}/data", s.readData)
	mux.HandleFunc("POST /cbt/vms/{vm}/disks/{key}/mode", s.setDiskMode)
	mux.HandleFunc("POST /cbt/vms/{vm}/consolidation-needed", s.setConsolidationNeeded)
	mux.HandleFunc("POST /cbt/vms/{vm}/guest", s.setGuest)
	mux.HandleFunc("GET /cbt/snapshots/{snap}/disks/{key}/export", s.export)
	mux.HandleFunc("GET /cbt/vddk/disk", s.vddkDisk)
	mux.HandleFunc("POST /cbt/faults", s.addFault)
	mux.HandleFunc("DELETE /cbt/faults", s.clearFaults)
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, errNotFound):
			code = http.StatusNotFound
		case errors.Is(err, errBadRequest):
			code = http.StatusBadRequest
		}
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}

func decode(r *http.Request, v any) error {
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(v); err != nil {
		return fmt.Errorf("%w: %v", errBadRequest, err)
	}
	return nil
}

func (s *sideChannel) ctx() *simulator.Context {
	return &simulator.Context{Context: context.Background(), Map: s.model.Service.Context.Map}
}

func (s *sideChannel) health(w http.ResponseWriter, _ *http.Request) {
	reply(w, map[string]any{"ok": true, "nbd": s.nbdAddr}, nil)
}

type diskInfo struct {
	Key      int32  `json:"key"`
	File     string `json:"file"`
	UUID     string `json:"uuid"`
	Capacity int64  `json:"capacity"`
	ChangeID string `json:"change_id"`
	DiskMode string `json:"disk_mode"`
	RDM      string `json:"rdm"` // compatibilityMode of an RDM backing, "" for a flat disk
}

type vmInfo struct {
	Moref        string     `json:"moref"`
	Name         string     `json:"name"`
	InstanceUUID string     `json:"instance_uuid"`
	Path         string     `json:"path"`
	CBT          bool       `json:"cbt"`
	CBTPending   bool       `json:"cbt_pending"` // a CBT switch waits for the next stun
	Disks        []diskInfo `json:"disks"`
}

func (s *sideChannel) lookupVM(moref string) (*simulator.VirtualMachine, error) {
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: moref}
	vm, ok := s.model.Service.Context.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil, fmt.Errorf("%w: VM %s", errNotFound, moref)
	}
	return vm, nil
}

// inventoryPath walks the parents up to the root folder: "/DC0/vm/name".
func inventoryPath(m *simulator.Registry, e mo.Entity) string {
	var names []string
	for e != nil {
		me := e.Entity()
		if me.Parent == nil {
			break
		}
		names = append([]string{me.Name}, names...)
		next, _ := m.Get(*me.Parent).(mo.Entity)
		e = next
	}
	return "/" + strings.Join(names, "/")
}

func (s *sideChannel) describe(moref string) (*vmInfo, error) {
	vm, err := s.lookupVM(moref)
	if err != nil {
		return nil, err
	}
	ctx := s.ctx()
	info := &vmInfo{}
	ctx.Map.WithLock(ctx, vm, func() {
		info.Moref, info.Name, info.InstanceUUID = vm.Self.Value, vm.Name, vm.Config.InstanceUuid
		s.cbt.mu.Lock()
		defer s.cbt.mu.Unlock()
		info.CBT = s.cbt.isTracking(vm)
		info.CBTPending = s.cbt.pendingSwitch(vm)
		for _, d := range vmDisks(vm.Config.Hardware.Device) {
			if _, err := s.cbt.track(ctx, vm, d); err != nil {
				log.Printf("describe %s: %v", vm.Name, err)
			}
			di := diskInfo{Key: d.Key, File: diskFile(d), Capacity: d.CapacityInBytes}
			switch b := d.Backing.(type) {
			case *types.VirtualDiskFlatVer2BackingInfo:
				di.UUID, di.ChangeID, di.DiskMode = b.Uuid, b.ChangeId, b.DiskMode
			case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
				di.UUID, di.ChangeID, di.DiskMode, di.RDM = b.Uuid, b.ChangeId, b.DiskMode, b.CompatibilityMode
			}
			info.Disks = append(info.Disks, di)
		}
	})
	info.Path = inventoryPath(ctx.Map, vm)
	return info, nil
}

func (s *sideChannel) getVM(w http.ResponseWriter, r *http.Request) {
	info, err := s.describe(r.PathValue("vm"))
	reply(w, info, err)
}

type createReq struct {
	Name    string  `json:"name"`
	Disks   []int64 `json:"disks"` // capacities in bytes (multiples of 1024)
	CBT     bool    `json:"cbt"`
	PowerOn bool    `json:"power_on"`
	hardwareReq
}

func checkCapacity(c int64) error {
	if c <= 0 || c%1024 != 0 {
		return fmt.Errorf("%w: disk capacity %d must be a positive multiple of 1024", errBadRequest, c)
	}
	return nil
}

func (s *sideChannel) createVM(w http.ResponseWriter, r *http.Request) {
	var req createReq
	if err := decode(r, &req); err != nil {
		reply(w, nil, err)
		return
	}
	info, err := s.doCreateVM(r.Context(), req)
	reply(w, info, err)
}

func (s *sideChannel) doCreateVM(ctx context.Context, req createReq) (*vmInfo, error) {
	if req.Name == "" || strings.ContainsAny(req.Name, "/[]") || len(req.Disks) == 0 {
		return nil, fmt.Errorf("%w: need a plain name and at least one disk", errBadRequest)
	}
	for _, c := range req.Disks {
		if err := checkCapacity(c); err != nil {
			return nil, err
		}
	}
	finder := find.NewFinder(s.client)
	dc, err := finder.DefaultDatacenter(ctx)
	if err != nil {
		return nil, err
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return nil, err
	}
	host, err := finder.DefaultHostSystem(ctx)
	if err != nil {
		return nil, err
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return nil, err
	}
	ds, err := finder.DefaultDatastore(ctx)
	if err != nil {
		return nil, err
	}
	dsName := ds.Name()
	devices, later, err := s.createDevices(ctx, finder, req, ds)
	if err != nil {
		return nil, err
	}
	spec := types.VirtualMachineConfigSpec{
		Name:                  req.Name,
		GuestId:               string(types.VirtualMachineGuestOsIdentifierOtherGuest),
		Files:                 &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", dsName)},
		ChangeTrackingEnabled: types.NewBool(req.CBT),
	}
	req.hardwareReq.apply(&spec)
	spec.DeviceChange, _ = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	for _, dc := range spec.DeviceChange {
		if _, ok := dc.GetVirtualDeviceConfigSpec().Device.(*types.VirtualDisk); ok {
			dc.GetVirtualDeviceConfigSpec().FileOperation = types.VirtualDeviceConfigSpecFileOperationCreate
		}
	}
	task, err := folders.VmFolder.CreateVM(ctx, spec, pool, host)
	if err != nil {
		return nil, err
	}
	res, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return nil, err
	}
	ref := res.Result.(types.ManagedObjectReference)
	for _, d := range later { // disks on the default IDE controller, which exists only now
		if err := s.addDiskOn(ctx, ref.Value, d.kind, d.capacity, d.file); err != nil {
			return nil, err
		}
	}
	if vm, err := s.lookupVM(ref.Value); err == nil {
		s.applyGuest(vm, guestBehaviour{Tools: req.Tools})
	}
	if req.PowerOn {
		vm := object.NewVirtualMachine(s.client, ref)
		if task, err = vm.PowerOn(ctx); err == nil {
			_, err = task.WaitForResult(ctx, nil)
		}
		if err != nil {
			return nil, err
		}
	}
	return s.describe(ref.Value)
}

type capacityReq struct {
	Capacity int64 `json:"capacity"`
}

func (s *sideChannel) reconfigure(ctx context.Context, moref string, change types.BaseVirtualDeviceConfigSpec) error {
	vm := object.NewVirtualMachine(s.client, types.ManagedObjectReference{Type: "VirtualMachine", Value: moref})
	task, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{change}})
	if err != nil {
		return err
	}
	_, err = task.WaitForResult(ctx, nil)
	return err
}

func (s *sideChannel) addDisk(w http.ResponseWriter, r *http.Request) {
	var req capacityReq
	err := decode(r, &req)
	if err == nil {
		err = checkCapacity(req.Capacity)
	}
	if err == nil {
		err = s.doAddDisk(r.Context(), r.PathValue("vm"), req.Capacity)
	}
	if err != nil {
		reply(w, nil, err)
		return
	}
	info, err := s.describe(r.PathValue("vm"))
	reply(w, info, err)
}

func (s *sideChannel) doAddDisk(ctx context.Context, moref string, capacity int64) error {
	if _, err := s.lookupVM(moref); err != nil {
		return err
	}
	vm := object.NewVirtualMachine(s.client, types.ManagedObjectReference{Type: "VirtualMachine", Value: moref})
	devices, err := vm.Device(ctx)
	if err != nil {
		return err
	}
	ctrl, err := devices.FindSCSIController("")
	if err != nil {
		return fmt.Errorf("%w: %v", errBadRequest, err)
	}
	existing := devices.SelectByType((*types.VirtualDisk)(nil))
	first := existing[0].(*types.VirtualDisk)
	p, err := parseDSPath(diskFile(first))
	if err != nil {
		return err
	}
	name := fmt.Sprintf("%s_add%d.vmdk", strings.TrimSuffix(filepath.Base(p.Path), ".vmdk"), time.Now().UnixNano())
	file := fmt.Sprintf("[%s] %s", p.Datastore, path.Join(path.Dir(p.Path), name))
	disk := devices.CreateDisk(ctrl, types.ManagedObjectReference{}, file)
	disk.CapacityInBytes, disk.CapacityInKB = capacity, capacity/1024
	return s.reconfigure(ctx, moref, &types.VirtualDeviceConfigSpec{
		Operation:     types.VirtualDeviceConfigSpecOperationAdd,
		FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
		Device:        disk,
	})
}

func pathKey(r *http.Request) (int32, error) {
	k, err := strconv.ParseInt(r.PathValue("key"), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: device key %q", errBadRequest, r.PathValue("key"))
	}
	return int32(k), nil
}

func (s *sideChannel) resizeDisk(w http.ResponseWriter, r *http.Request) {
	var req capacityReq
	err := decode(r, &req)
	key, kerr := pathKey(r)
	err = errors.Join(err, kerr)
	if err == nil {
		err = checkCapacity(req.Capacity)
	}
	if err == nil {
		err = s.doResize(r.Context(), r.PathValue("vm"), key, req.Capacity)
	}
	if err != nil {
		reply(w, nil, err)
		return
	}
	info, err := s.describe(r.PathValue("vm"))
	reply(w, info, err)
}

func (s *sideChannel) doResize(ctx context.Context, moref string, key int32, capacity int64) error {
	if _, err := s.lookupVM(moref); err != nil {
		return err
	}
	vm := object.NewVirtualMachine(s.client, types.ManagedObjectReference{Type: "VirtualMachine", Value: moref})
	devices, err := vm.Device(ctx)
	if err != nil {
		return err
	}
	d, ok := devices.FindByKey(key).(*types.VirtualDisk)
	if !ok {
		return fmt.Errorf("%w: no disk with key %d", errNotFound, key)
	}
	if capacity < d.CapacityInBytes {
		return fmt.Errorf("%w: cannot shrink a disk", errBadRequest)
	}
	cp := *d
	cp.CapacityInBytes, cp.CapacityInKB = capacity, capacity/1024
	return s.reconfigure(ctx, moref, &types.VirtualDeviceConfigSpec{
		Operation: types.VirtualDeviceConfigSpecOperationEdit,
		Device:    &cp,
	})
}

func queryInt(r *http.Request, name string) (int64, error) {
	v, err := strconv.ParseInt(r.URL.Query().Get(name), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: query parameter %s", errBadRequest, name)
	}
	return v, nil
}

func (s *sideChannel) writeData(w http.ResponseWriter, r *http.Request) {
	key, err := pathKey(r)
	offset, oerr := queryInt(r, "offset")
	err = errors.Join(err, oerr)
	var data []byte
	if err == nil {
		data, err = io.ReadAll(io.LimitReader(r.Body, maxWrite+1))
		if err == nil && len(data) > maxWrite {
			err = fmt.Errorf("%w: write larger than %d bytes", errBadRequest, maxWrite)
		}
	}
	var vm *simulator.VirtualMachine
	if err == nil {
		vm, err = s.lookupVM(r.PathValue("vm"))
	}
	if err == nil {
		ctx := s.ctx()
		ctx.Map.WithLock(ctx, vm, func() { err = s.cbt.write(ctx, vm, key, offset, data) })
	}
	reply(w, map[string]int{"written": len(data)}, err)
}

// resetDiskCBT starts a new CBT epoch for one disk (see CBT.resetDisk).
func (s *sideChannel) resetDiskCBT(w http.ResponseWriter, r *http.Request) {
	key, err := pathKey(r)
	var vm *simulator.VirtualMachine
	if err == nil {
		vm, err = s.lookupVM(r.PathValue("vm"))
	}
	if err == nil {
		ctx := s.ctx()
		ctx.Map.WithLock(ctx, vm, func() { err = s.cbt.resetDisk(ctx, vm, key) })
	}
	if err != nil {
		reply(w, nil, err)
		return
	}
	info, err := s.describe(r.PathValue("vm"))
	reply(w, info, err)
}

func (s *sideChannel) readData(w http.ResponseWriter, r *http.Request) {
	key, err := pathKey(r)
	offset, oerr := queryInt(r, "offset")
	length, lerr := queryInt(r, "length")
	err = errors.Join(err, oerr, lerr)
	var vm *simulator.VirtualMachine
	if err == nil {
		vm, err = s.lookupVM(r.PathValue("vm"))
	}
	var data []byte
	if err == nil {
		ctx := s.ctx()
		ctx.Map.WithLock(ctx, vm, func() { data, err = s.cbt.read(ctx, vm, key, offset, length) })
	}
	if err != nil {
		reply(w, nil, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	_, _ = w.Write(data)
}

// export answers where a snapshot disk is served over NBD. In production this is where
// `nbdkit vddk` would be started for (VM, snapshot, disk); here one `nbdkit file dir=` serves
// every frozen image under its file name.
func (s *sideChannel) export(w http.ResponseWriter, r *http.Request) {
	key, err := pathKey(r)
	if err != nil {
		reply(w, nil, err)
		return
	}
	fd, owner := s.cbt.frozen(r.PathValue("snap"), key)
	if fd == nil {
		reply(w, nil, fmt.Errorf("%w: no disk %d in snapshot %s", errNotFound, key, r.PathValue("snap")))
		return
	}
	name := filepath.Base(fd.image)
	reply(w, map[string]any{
		"uri":       fmt.Sprintf("nbd://%s/%s", s.nbdAddr, name),
		"host_port": s.nbdAddr,
		"export":    name,
		"vm":        owner.Value,
		"capacity":  fd.capacity,
		"change_id": fd.changeID,
	}, nil)
}

// vddkDisk is what the project's stand-in for nbdkit's vddk plugin (devstack/nbdkit-vddk) asks
// once it has logged in: the frozen image of the disk VDDK would open for vm=moref=<vm>
// snapshot=<snapshot> file=<backing file in the snapshot's config>. 404 when that VM has no
// such snapshot or the snapshot no such disk, as VixDiskLib_Open fails.
func (s *sideChannel) vddkDisk(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	vm, snap, file := q.Get("vm"), q.Get("snapshot"), q.Get("file")
	if vm == "" || snap == "" || file == "" {
		reply(w, nil, fmt.Errorf("%w: need vm, snapshot and file", errBadRequest))
		return
	}
	fd := s.cbt.frozenByFile(vm, snap, file)
	if fd == nil {
		reply(w, nil, fmt.Errorf("%w: VM %s has no snapshot %s with disk file %q", errNotFound, vm, snap, file))
		return
	}
	reply(w, map[string]any{"image": fd.image, "capacity": fd.capacity, "key": fd.key}, nil)
}

type faultReq struct {
	Method string `json:"method"`
	Object string `json:"object"` // entity name, "*" for any
	Fault  string `json:"fault"`
	Count  int    `json:"count"` // 0 = until cleared
	Delay  int    `json:"delay_ms"`
}

var faultTypes = map[string]simulator.FaultType{
	"timeout":           simulator.FaultTypeTimeout,
	"network":           simulator.FaultTypeNetworkFailure,
	"invalid_state":     simulator.FaultTypeInvalidState,
	"not_authenticated": simulator.FaultTypeNotAuthenticated,
	"no_permission":     simulator.FaultTypeNoPermission,
	"invalid_argument":  simulator.FaultTypeInvalidArgument,
	"resource_in_use":   simulator.FaultTypeResourceInUse,
	"generic":           simulator.FaultTypeGeneric,
}

// addFault injects a fault with the simulator's own FaultInjector.
func (s *sideChannel) addFault(w http.ResponseWriter, r *http.Request) {
	var req faultReq
	if err := decode(r, &req); err != nil {
		reply(w, nil, err)
		return
	}
	ft, ok := faultTypes[req.Fault]
	if !ok || req.Method == "" {
		reply(w, nil, fmt.Errorf("%w: need method and fault (one of timeout, network, ...)", errBadRequest))
		return
	}
	obj := req.Object
	if obj == "" {
		obj = "*"
	}
	rule := &simulator.FaultInjectionRule{
		MethodName: req.Method, ObjectType: "*", ObjectName: obj, Probability: 1.0,
		FaultType: ft, MaxCount: req.Count, Delay: req.Delay, Enabled: true,
	}
	if ft == simulator.FaultTypeTimeout || ft == simulator.FaultTypeNetworkFailure || ft == simulator.FaultTypeGeneric {
		// The injector's own fault for these is types.SystemErrorFault, which serializes under
		// a name pyvmomi does not know; vmodl's real fault is SystemError.
		rule.FaultType = simulator.FaultTypeCustom
		rule.Fault = &types.SystemError{Reason: "injected " + req.Fault}
	}
	s.model.Service.FaultInjector().AddRule(rule)
	reply(w, map[string]bool{"ok": true}, nil)
}

func (s *sideChannel) clearFaults(w http.ResponseWriter, _ *http.Request) {
	s.model.Service.FaultInjector().ClearRules()
	reply(w, map[string]bool{"ok": true}, nil)
}
