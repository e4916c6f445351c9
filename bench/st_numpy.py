"""Safetensors and NVFP4 (compressed-tensors layout) reading in numpy, for the estimate scripts
of bench/ (norm_tweak_estimate.py, awq_estimate.py)."""
import json, struct

import numpy as np


def load(p):
    """Every tensor of a safetensors file as (dtype, array); FP8 stays raw bytes."""
    f=open(p,'rb'); n=struct.unpack('<Q',f.read(8))[0]; h=json.loads(f.read(n)); base=8+n
    data=open(p,'rb').read()
    out={}
    for k,v in h.items():
        if k=='__metadata__': continue
        a,b=v['data_offsets']; raw=data[base+a:base+b]; dt=v['dtype']; sh=v['shape']
        if dt=='BF16':
            x=np.frombuffer(raw,dtype=np.uint16).astype(np.uint32)<<16; arr=x.view(np.float32).reshape(sh)
        elif dt=='F32': arr=np.frombuffer(raw,dtype=np.float32).reshape(sh)
        elif dt=='U8': arr=np.frombuffer(raw,dtype=np.uint8).reshape(sh)
        elif dt=='F8_E4M3': arr=np.frombuffer(raw,dtype=np.uint8).reshape(sh)
        else: continue
        out[k]=(dt,arr)
    return out


def e4m3(b):
    """E4M3 bytes to floats (subnormals included; no NaN in scales)."""
    b=b.astype(np.int32); s=np.where(b&0x80,-1.0,1.0); e=(b>>3)&0xF; m=b&7
    v=np.where(e==0, m/8.0*2.0**-6, (1+m/8.0)*2.0**(e-7)); return s*v
FP4=np.array([0,0.5,1,1.5,2,3,4,6,-0.0,-0.5,-1,-1.5,-2,-3,-4,-6])


def deq(q,name):
    """compressed-tensors NVFP4: low nibble first, value * E4M3 block scale / global scale."""
    p=q[name+'.weight_packed'][1]; sc=e4m3(q[name+'.weight_scale'][1]); gs=q[name+'.weight_global_scale'][1][0]
    lo=FP4[p&0xF]; hi=FP4[p>>4]
    v=np.stack([lo,hi],-1).reshape(p.shape[0],-1)
    return v*np.repeat(sc,16,axis=1)/gs
