"""Before/after check of this session (kept with its results): run from a checkout, e.g.
    python benchmarks/results/cpu-2cores/session-p4dtpe/compare_old_new.py 1,2 25 new
args: thread counts, seconds of interleaved rounds per thread count, a label. Times (ms, medians)
of copy_, sum, tpe_add (sinusoidal) forward, the TPE table gradient (autograd.grad), and
p4d_loss full (paper-B1) for rgpt4d, eager and torch.compile, interleaved round by round."""
import sys, time, torch, statistics, os
sys.path.insert(0, os.getcwd())
from rgpt4d.ops import tpe_add, p4d_loss
from benchmarks.bench_p4d_loss import p4d_inputs
torch.manual_seed(0)
B,Tn,N,D = 1,16,729,1152
x = torch.randn(B,Tn,N,D); secs = torch.rand(B,Tn)*30
table = torch.randn(500,D, requires_grad=True); rows = torch.randint(0,500,(B,Tn))
dst = torch.empty_like(x); g = torch.randn_like(x)
out = tpe_add(x, rows, table)
lat, lat_t, preds, targets, masks = p4d_inputs(1, 8*16*16, 1408, 16, 224, 224, device='cpu')
inputs=[lat,*preds.values()]
def p4d_full(be):
    def f():
        o = p4d_loss(lat, lat_t, preds, targets, preset='paper', masks=masks, backend=be).total
        return torch.autograd.grad(o, inputs)
    return f
ceager = torch.compile(lambda: p4d_loss(lat, lat_t, preds, targets, preset='paper', masks=masks, backend='eager').total)
def comp():
    return torch.autograd.grad(ceager(), inputs)
fns = {'copy_': lambda: dst.copy_(x), 'sum': lambda: x.sum(),
       'tpe_sin_fwd': lambda: tpe_add(x, secs, validate=False),
       'tpe_tbl_bwd': lambda: torch.autograd.grad(out, [table], g, retain_graph=True),
       'p4d_rgpt4d': p4d_full(None), 'p4d_eager': p4d_full('eager'), 'p4d_compile': comp}
for th in [int(a) for a in sys.argv[1].split(',')]:
    torch.set_num_threads(th)
    ts = {k: [] for k in fns}
    for f in fns.values(): f(); f()
    t_end = time.time() + float(sys.argv[2])
    r = 0
    while time.time() < t_end or r < 5:
        for k, f in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            t=time.perf_counter(); f(); ts[k].append(time.perf_counter()-t)
        r += 1
    med = {k: statistics.median(v)*1e3 for k,v in ts.items()}
    pe = statistics.median([a/b for a, b in zip(ts['p4d_eager'], ts['p4d_rgpt4d'])])
    pc = statistics.median([a/b for a, b in zip(ts['p4d_compile'], ts['p4d_rgpt4d'])])
    print(f"[{sys.argv[3]}] threads {th} rounds {r} load {os.getloadavg()[0]:.2f}: " + " ".join(f"{k} {v:.2f}" for k,v in med.items()))
    print(f"[{sys.argv[3]}] threads {th}: tpe_sin_fwd/copy_ {med['copy_']/med['tpe_sin_fwd']:.2f}  tbl_bwd/read {med['sum']/med['tpe_tbl_bwd']:.2f}  p4d vs eager {pe:.2f}x vs compile {pc:.2f}x (paired medians)", flush=True)
