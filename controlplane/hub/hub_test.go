package hub

import (
	"testing"
	"time"
)

func TestFlushAtDebouncesButBoundsTheWait(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	quiet, maxDelay := 20*time.Millisecond, 200*time.Millisecond
	tests := []struct {
		name        string
		first, last time.Duration
		want        time.Duration
	}{
		{"single event waits for quiet", 0, 0, 20 * time.Millisecond},
		{"a burst extends the wait", 0, 50 * time.Millisecond, 70 * time.Millisecond},
		{"a long burst is flushed at the bound", 0, 190 * time.Millisecond, 200 * time.Millisecond},
		{"a never-ending burst is flushed at the bound", 0, time.Hour, 200 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := FlushAt(t0.Add(tt.first), t0.Add(tt.last), quiet, maxDelay)
			if want := t0.Add(tt.want); !got.Equal(want) {
				t.Fatalf("FlushAt = %v after start, want %v", got.Sub(t0), tt.want)
			}
		})
	}
}
