-- Argo CD health of a gptq.dev QuantizationJob.
-- Healthy once it succeeded; Degraded when it failed, stalled or no node can run it;
-- Progressing until the operator has seen the current spec and while the worker runs.
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

if obj.status == nil or obj.status.observedGeneration == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the current spec"
  return hs
end

local ready = condition("Ready")
local stalled = condition("Stalled")
local phase = obj.status.phase

if phase == "Succeeded" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Succeeded"
  return hs
end
if phase == "Failed" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  hs.message = (stalled ~= nil and stalled.message) or (ready ~= nil and ready.message) or "Failed"
  return hs
end
if phase == "Unschedulable" then
  hs.status = "Degraded"
  hs.message = (ready ~= nil and ready.message) or "No node can run the worker"
  return hs
end

hs.status = "Progressing"
if obj.status.progress ~= nil and obj.status.progress.message ~= nil then
  hs.message = obj.status.progress.message
elseif ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
else
  hs.message = phase or "Pending"
end
return hs
