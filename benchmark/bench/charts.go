package bench

import (
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// ThroughputChart draws confirmed publish msgs/s against the number of
// publishers, one line per system, for tier; it returns the file's name.
func ThroughputChart(dir string, tier Tier, rs []*Result) (string, error) {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Confirmed publish throughput, %s tier", tier)
	p.X.Label.Text = "concurrent publishers (C)"
	p.Y.Label.Text = "messages/s"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.ConstantTicks([]plot.Tick{{Value: 1, Label: "1"}, {Value: 16, Label: "16"}, {Value: 64, Label: "64"}})
	p.Y.Min = 0
	var lines []any
	for _, sys := range systemsOf(rs) {
		var xy plotter.XYs
		for _, r := range rs {
			if r.System == sys && r.Tier == tier && r.Workload == Throughput {
				xy = append(xy, plotter.XY{X: float64(r.Publishers), Y: r.PublishedRate})
			}
		}
		if len(xy) > 0 {
			lines = append(lines, sys, xy)
		}
	}
	if len(lines) == 0 {
		return "", nil
	}
	if err := plotutil.AddLinePoints(p, lines...); err != nil {
		return "", err
	}
	p.Legend.Top = true
	name := fmt.Sprintf("throughput-%s.png", tier)
	return name, p.Save(16*vg.Centimeter, 10*vg.Centimeter, filepath.Join(dir, name))
}

// LatencyChart draws, for the latency runs of tier, end-to-end p50, p99,
// p99.9 and max on a log scale: a line for each run, labelled with its
// system and offered rate.
func LatencyChart(dir string, tier Tier, rs []*Result) (string, error) {
	var lines []any
	for _, r := range rs {
		if r.Workload != Latency || r.Tier != tier {
			continue
		}
		q := r.EndToEnd
		xy := plotter.XYs{{X: 1, Y: q.P50 / 1000}, {X: 2, Y: q.P99 / 1000}, {X: 3, Y: q.P999 / 1000}, {X: 4, Y: q.Max / 1000}}
		for i := range xy {
			xy[i].Y = max(xy[i].Y, 0.001) // a log scale has no 0
		}
		lines = append(lines, fmt.Sprintf("%s at %.0f/s", r.System, r.Rate), xy)
	}
	if len(lines) == 0 {
		return "", nil
	}
	p := plot.New()
	p.Title.Text = fmt.Sprintf("End-to-end latency, %s tier (open loop)", tier)
	p.Y.Label.Text = "milliseconds"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.TickerFunc(oneTwoFive)
	p.X.Min, p.X.Max = 0.7, 4.3
	p.X.Tick.Marker = plot.ConstantTicks([]plot.Tick{{Value: 1, Label: "p50"}, {Value: 2, Label: "p99"}, {Value: 3, Label: "p99.9"}, {Value: 4, Label: "max"}})
	if err := plotutil.AddLinePoints(p, lines...); err != nil {
		return "", err
	}
	p.Legend.Top = true
	p.Legend.Left = true
	name := fmt.Sprintf("latency-%s.png", tier)
	return name, p.Save(16*vg.Centimeter, 10*vg.Centimeter, filepath.Join(dir, name))
}

// oneTwoFive labels 1, 2 and 5 times each power of ten between min and
// max, for a log scale.
func oneTwoFive(min, max float64) []plot.Tick {
	var ticks []plot.Tick
	for e := math.Floor(math.Log10(min)); e <= math.Ceil(math.Log10(max)); e++ {
		for _, m := range []float64{1, 2, 5} {
			if v := m * math.Pow(10, e); v >= min && v <= max {
				ticks = append(ticks, plot.Tick{Value: v, Label: strconv.FormatFloat(v, 'g', -1, 64)})
			}
		}
	}
	return ticks
}

func systemsOf(rs []*Result) []string {
	var out []string
	for _, r := range rs {
		if !slices.Contains(out, r.System) {
			out = append(out, r.System)
		}
	}
	return out
}
