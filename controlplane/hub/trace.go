package hub

import (
	"context"
	"strconv"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
)

var propagator = propagation.TraceContext{}

// startFlushTrace records a span for a generation and returns its W3C
// context, which every delta of that generation carries so agents' spans
// join the same trace.
func startFlushTrace(changed []string, gen uint64) map[string]string {
	ctx, span := otel.Tracer("signalbox/controlplane").Start(context.Background(), "flush generation "+strconv.FormatUint(gen, 10))
	span.SetAttributes(attribute.Int("services", len(changed)), attribute.Int64("generation", int64(gen)))
	defer span.End()
	carrier := propagation.MapCarrier{}
	propagator.Inject(ctx, carrier)
	if len(carrier) == 0 {
		return nil
	}
	return carrier
}
