// Umbrella header of the npufa C++ API.
#pragma once
#include "npufa/dropout.h"
#include "npufa/error.h"
#include "npufa/layout.h"
#include "npufa/ops/fusion_attention.h"
#include "npufa/ops/fusion_attention_grad.h"
#include "npufa/ops/infer_attention.h"
#include "npufa/parallel.h"
#include "npufa/tensor_view.h"
