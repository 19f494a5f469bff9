package bench

import (
	"fmt"
	"path/filepath"
	"slices"

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

// LatencyChart draws end-to-end p50, p99 and p99.9 of the latency runs,
// grouped by tier and system.
func LatencyChart(dir string, rs []*Result) (string, error) {
	var runs []*Result
	for _, r := range rs {
		if r.Workload == Latency {
			runs = append(runs, r)
		}
	}
	if len(runs) == 0 {
		return "", nil
	}
	p := plot.New()
	p.Title.Text = "End-to-end latency at 50% of each system's maximum rate"
	p.Y.Label.Text = "milliseconds"
	var labels []string
	for _, r := range runs {
		labels = append(labels, fmt.Sprintf("%s\n%s", r.System, r.Tier))
	}
	w := vg.Points(10)
	for i, q := range []struct {
		name string
		get  func(Quantiles) float64
	}{{"p50", func(q Quantiles) float64 { return q.P50 }}, {"p99", func(q Quantiles) float64 { return q.P99 }},
		{"p99.9", func(q Quantiles) float64 { return q.P999 }}} {
		var vs plotter.Values
		for _, r := range runs {
			vs = append(vs, q.get(r.EndToEnd)/1000)
		}
		bars, err := plotter.NewBarChart(vs, w)
		if err != nil {
			return "", err
		}
		bars.Color = plotutil.Color(i)
		bars.LineStyle.Width = 0
		bars.Offset = w * vg.Length(i-1)
		p.Add(bars)
		p.Legend.Add(q.name, bars)
	}
	p.Legend.Top = true
	p.NominalX(labels...)
	name := "latency.png"
	return name, p.Save(vg.Length(max(16, 2.2*float64(len(runs))))*vg.Centimeter, 10*vg.Centimeter, filepath.Join(dir, name))
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
