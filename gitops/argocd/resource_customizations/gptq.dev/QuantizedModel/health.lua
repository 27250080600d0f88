-- Argo CD health of a gptq.dev QuantizedModel.
-- Healthy when Ready; Suspended at zero replicas; Degraded when failed, degraded or
-- stalled (an incompatible kernel, say); Progressing while it waits for its checkpoint or
-- its serving pods, and until the operator has seen the current spec.
local hs = {}

local function condition(name)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == name then
        return c
      end
    end
  end
  return nil
end

if obj.spec ~= nil and obj.spec.replicas == 0 then
  hs.status = "Suspended"
  hs.message = "Scaled to zero replicas"
  return hs
end

if obj.status == nil or obj.status.observedGeneration == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the current spec"
  return hs
end

local ready = condition("Ready")
local stalled = condition("Stalled")
local phase = obj.status.phase

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
if phase == "Failed" or phase == "Degraded" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  hs.message = (stalled ~= nil and stalled.message) or (ready ~= nil and ready.message) or phase
  return hs
end

hs.status = "Progressing"
hs.message = (ready ~= nil and ready.message) or phase or "Pending"
return hs
