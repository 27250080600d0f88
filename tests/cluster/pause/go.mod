module gptq-operator/pause

go 1.24
