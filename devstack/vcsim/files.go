package main

// File helpers: sparse copies for frozen images, growing flat extents, datastore paths.

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vmware/govmomi/object"
)

var (
	errNotFound   = errors.New("not found")
	errBadRequest = errors.New("bad request")
)

// ensureSize grows (never shrinks) a flat extent to size bytes; the new tail is a hole.
func ensureSize(path string, size int64) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Size() >= size {
		return nil
	}
	return os.Truncate(path, size)
}

// copyBlocks writes the given 64 KiB blocks of src into dst and sizes dst to capacity. Blocks
// never written stay holes, so a frozen image is as sparse as the disk it was taken from and
// its allocated blocks are exactly the ones listed.
func copyBlocks(src string, dst *os.File, blocks []int64, capacity int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	buf := make([]byte, blockSize)
	for _, b := range blocks {
		off := b * blockSize
		n := blockSize
		if off+n > capacity {
			n = capacity - off
		}
		if n <= 0 {
			continue
		}
		got, err := in.ReadAt(buf[:n], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		clear(buf[got:n])
		if _, err := dst.WriteAt(buf[:n], off); err != nil {
			return err
		}
	}
	return dst.Truncate(capacity)
}

func parseDSPath(file string) (*object.DatastorePath, error) {
	var p object.DatastorePath
	if !p.FromString(file) {
		return nil, fmt.Errorf("not a datastore path: %q", file)
	}
	return &p, nil
}
