package main

// Pure CBT bookkeeping: block maps, change IDs and QueryChangedDiskAreas paging. No I/O here, so
// the rules can be read (and unit-tested) without a running simulator.
//
// Model (one per virtual disk, like ESXi's per-disk .ctk file):
//   - epoch: a random UUID printed the way ESXi prints it ("52 8a ... 51-7a ... a6"); a new epoch
//     starts whenever change tracking is (re-)enabled, which voids every older change ID.
//   - gen: the open generation. A guest write stamps each 64 KiB block it touches with gen.
//   - a snapshot freezes the block stamps, gets change ID "<epoch>/<gen>" and then gen++, so
//     "changed since change ID g" is exactly "stamp > g" in the snapshot's frozen stamps.

import (
	"crypto/rand"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// blockSize is ESXi's CBT granularity for the disks we simulate.
const blockSize int64 = 64 * 1024

var changeIDRe = regexp.MustCompile(`^([0-9a-fA-F][0-9a-fA-F \-]*[0-9a-fA-F])/([0-9]{1,18})$`)

// newEpoch returns a random UUID in ESXi's "xx xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx" form.
func newEpoch() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	hexes := make([]string, 16)
	for i, v := range b {
		hexes[i] = fmt.Sprintf("%02x", v)
	}
	return strings.Join(hexes[:8], " ") + "-" + strings.Join(hexes[8:], " ")
}

func formatChangeID(epoch string, gen int64) string {
	return fmt.Sprintf("%s/%d", epoch, gen)
}

// parseChangeID splits "<epoch>/<seq>"; ok is false when the text is malformed.
func parseChangeID(text string) (epoch string, seq int64, ok bool) {
	m := changeIDRe.FindStringSubmatch(text)
	if m == nil {
		return "", 0, false
	}
	seq, err := strconv.ParseInt(m[2], 10, 64)
	if err != nil {
		return "", 0, false
	}
	return m[1], seq, true
}

// markBlocks returns the indexes of the 64 KiB blocks touched by [offset, offset+length).
func markBlocks(offset, length int64) (first, last int64) {
	return offset / blockSize, (offset + length - 1) / blockSize
}

// blocksSince lists, sorted, the blocks whose stamp is greater than gen.
func blocksSince(stamps map[int64]int64, gen int64) []int64 {
	out := make([]int64, 0, len(stamps))
	for b, g := range stamps {
		if g > gen {
			out = append(out, b)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// sortedBlocks lists the blocks of a set, sorted.
func sortedBlocks(set map[int64]struct{}) []int64 {
	out := make([]int64, 0, len(set))
	for b := range set {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

type area struct{ Start, Length int64 }

// page computes one QueryChangedDiskAreas answer: the window [start, start+length) it covers and
// the changed areas inside it. A window is at most maxRange bytes and holds at most maxAreas
// areas (ESXi bounds both); when the area limit cuts it, the window ends where the last area
// ends so the caller's next startOffset (start+length) continues without a gap. Areas are runs
// of adjacent blocks, clipped to the window and to the disk's capacity.
func page(blocks []int64, start, capacity, maxRange int64, maxAreas int) (int64, []area) {
	end := start + maxRange
	if end > capacity || end < start { // overflow guard
		end = capacity
	}
	var areas []area
	i := sort.Search(len(blocks), func(i int) bool { return (blocks[i]+1)*blockSize > start })
	for ; i < len(blocks); i++ {
		s := blocks[i] * blockSize
		if s >= end {
			break
		}
		e := s + blockSize
		if s < start {
			s = start
		}
		if e > end {
			e = end
		}
		if n := len(areas); n > 0 && areas[n-1].Start+areas[n-1].Length == s {
			areas[n-1].Length = e - areas[n-1].Start
			continue
		}
		if len(areas) == maxAreas {
			last := areas[len(areas)-1]
			return last.Start + last.Length - start, areas
		}
		areas = append(areas, area{s, e - s})
	}
	return end - start, areas
}
