// Command vcsim-cbt is govmomi's vSphere simulator (v0.52.0) with Changed Block Tracking added:
// change IDs on snapshot disk backings, frozen snapshot images exported read-only over NBD by
// Debian's nbdkit, QueryChangedDiskAreas with paging and ESXi's faults, and a JSON side channel
// (/cbt/...) that plays the guest and the administrator for tests and demos.
//
// Everything it writes lives under -dir: datastores/ (vcsim's datastore folders, each disk a
// flat extent), frozen/ (one immutable image per snapshot disk, the NBD export names), cert.pem
// (the self-signed certificate clients verify against) and vcsim.json (addresses, written once
// the simulator is ready). State is in memory: a restart starts an empty inventory.
package main

import (
	"context"
	"crypto/sha1"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	// The vAPI endpoints (/rest, /api): tag categories, tags and their attachments, which
	// the scheduler's tag selectors read (cbtstream/vsphere/tags.py).
	_ "github.com/vmware/govmomi/vapi/simulator"
	"github.com/vmware/govmomi/vim25"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18989", "SOAP and side-channel address (host:port; port 0 = any)")
	nbdListen := flag.String("nbd-listen", "127.0.0.1:0", "NBD address of the frozen images (port 0 = any)")
	dir := flag.String("dir", "", "state directory (required)")
	useTLS := flag.Bool("tls", true, "serve HTTPS with a self-signed certificate written to <dir>/cert.pem")
	// ESXi bounds one QueryChangedDiskAreas answer; clients must page. 2 GiB and 2000 areas are
	// in the range seen on real hosts; tests lower them to exercise paging on small disks.
	pageBytes := flag.Int64("page-bytes", 2<<30, "largest range one QueryChangedDiskAreas call covers")
	maxAreas := flag.Int("max-areas", 2000, "most areas in one QueryChangedDiskAreas answer")
	machines := flag.Int("machines", 1, "stock VMs to create per host (each one 10 GiB disk)")
	flag.Parse()
	if *dir == "" || *pageBytes < blockSize || *maxAreas < 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*listen, *nbdListen, *dir, *useTLS, *pageBytes, *maxAreas, *machines); err != nil {
		log.Fatalf("vcsim-cbt: %v", err)
	}
}

func run(listen, nbdListen, dir string, useTLS bool, pageBytes int64, maxAreas, machines int) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	frozen := filepath.Join(dir, "frozen")
	datastores := filepath.Join(dir, "datastores")
	_ = os.Remove(filepath.Join(dir, "vcsim.json")) // written again once ready
	for _, d := range []string{frozen, datastores} {
		if err := os.RemoveAll(d); err != nil { // state is in memory; stale files would lie
			return err
		}
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	// vcsim puts its datastores under os.MkdirTemp(""), i.e. $TMPDIR.
	if err := os.Setenv("TMPDIR", datastores); err != nil {
		return err
	}

	nbd, err := startNBD(nbdListen, frozen)
	if err != nil {
		return err
	}
	defer nbd.close()
	nbdAddr := nbd.addr

	model := simulator.VPX()
	model.Cluster = 0 // one standalone host: every VM lives on it, no DRS placement
	model.Host = 1
	model.Machine = machines
	model.Autostart = false
	if err := model.Create(); err != nil {
		return err
	}
	defer model.Remove()

	cbt := newCBT(frozen, pageBytes, maxAreas)
	cbt.install(model.Service.Context.Map, model.Service.FaultInjector())

	// Only this user/password may log in (vcsim accepts any non-empty login otherwise). From
	// the environment, so the password is not visible in ps.
	user, pass := os.Getenv("VCSIM_USERNAME"), os.Getenv("VCSIM_PASSWORD")
	if user == "" || pass == "" {
		user, pass = "user", "pass"
	}
	model.Service.Listen = &url.URL{Host: listen, User: url.UserPassword(user, pass)}
	if useTLS {
		model.Service.TLS = new(tls.Config)
	}
	model.Service.RegisterEndpoints = true
	server := model.Service.NewServer()
	defer server.Close()

	client, err := vim25.NewClient(context.Background(), model.Service)
	if err != nil {
		return err
	}
	sc := &sideChannel{cbt: cbt, model: model, client: client, nbdAddr: nbdAddr}
	sc.register(model.Service.ServeMux)

	base := *server.URL
	base.User = nil
	info := map[string]any{"sdk": base.String(), "nbd": nbdAddr, "pid": os.Getpid()}
	base.Path = "/cbt"
	info["side_channel"] = base.String()
	if useTLS {
		// Every host of the model answers on this endpoint, so its certificate is theirs: a
		// client reading summary.config.sslThumbprint (as one connecting VDDK to an ESXi host
		// does) gets the thumbprint this server really presents.
		thumb := sslThumbprint(server.Certificate().Raw)
		for _, obj := range model.Service.Context.Map.All("HostSystem") {
			if h, ok := obj.(*simulator.HostSystem); ok {
				h.Summary.Config.SslThumbprint = thumb
			}
		}
		info["thumbprint"] = thumb
		cert := filepath.Join(dir, "cert.pem")
		pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: server.Certificate().Raw})
		if err := os.WriteFile(cert, pemBytes, 0o644); err != nil {
			return err
		}
		info["cert"] = cert
	}
	if err := writeJSON(filepath.Join(dir, "vcsim.json"), info); err != nil {
		return err
	}
	log.Printf("vcsim-cbt ready: sdk=%s side_channel=%s nbd=%s", server.URL.Redacted(), info["side_channel"], nbdAddr)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	s := <-sig
	log.Printf("vcsim-cbt: %s, stopping", s)
	return nil
}

// sslThumbprint is the SHA-1 of a DER certificate as vSphere writes it: "AA:BB:...".
func sslThumbprint(der []byte) string {
	sum := sha1.Sum(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// nbdServer runs one read-only `nbdkit file dir=<frozen>`: every frozen image is an export named
// after its file. We open the listening socket ourselves and hand it over with systemd socket
// activation (LISTEN_FDS), so port 0 works without a race and the address survives a restart.
// nbdkit 1.32 can abort when a client vanishes mid-reply (a copier killed with SIGKILL): the
// supervisor restarts it on the same socket, so one crashed client never takes the exports away
// from the others for more than a moment.
type nbdServer struct {
	addr   string
	file   *os.File
	frozen string
	mu     sync.Mutex
	cmd    *exec.Cmd
	stop   bool
}

func startNBD(addr, frozen string) (*nbdServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	f, err := ln.(*net.TCPListener).File()
	_ = ln.Close()
	if err != nil {
		return nil, err
	}
	n := &nbdServer{addr: ln.Addr().String(), file: f, frozen: frozen}
	if err := n.spawn(); err != nil {
		return nil, err
	}
	go n.supervise()
	return n, nil
}

func (n *nbdServer) spawn() error {
	cmd := exec.Command("/bin/sh", "-c",
		`LISTEN_PID=$$ LISTEN_FDS=1 exec nbdkit --foreground --exit-with-parent --readonly file dir="$0"`, n.frozen)
	cmd.ExtraFiles = []*os.File{n.file}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting nbdkit: %w", err)
	}
	n.mu.Lock()
	n.cmd = cmd
	n.mu.Unlock()
	return nil
}

func (n *nbdServer) supervise() {
	for {
		n.mu.Lock()
		cmd := n.cmd
		n.mu.Unlock()
		err := cmd.Wait()
		n.mu.Lock()
		stopping := n.stop
		n.mu.Unlock()
		if stopping {
			return
		}
		log.Printf("vcsim-cbt: nbdkit exited (%v), restarting it on %s", err, n.addr)
		time.Sleep(200 * time.Millisecond)
		for n.spawn() != nil {
			time.Sleep(time.Second)
		}
	}
}

func (n *nbdServer) close() {
	n.mu.Lock()
	n.stop = true
	cmd := n.cmd
	n.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		_ = cmd.Process.Kill()
	}
	_ = n.file.Close()
}
